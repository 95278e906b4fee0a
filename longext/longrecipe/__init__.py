"""LongRecipe (Hu et al. 2024, methods.md §4): sentence selection and the data it feeds the position transform."""

"""Random needles for the RULER tasks: word keys, numbers, UUIDs, and the word pool of common-words extraction.

RULER draws its word keys as adjective-noun pairs ("tremendous-clock") from the `wonderwords` package and the
words of common-words extraction from its word lists. Here the pairs come from two lists written for longext
(below; 158 adjectives x 201 nouns = 31,758 keys) and the extraction words from these lists plus every word of
the haystack texts (the offline books by default), so nothing depends on a word-list package.
"""

from __future__ import annotations

import random
import re
import uuid

ADJECTIVES = tuple("""
able amber ancient angry bitter black bold brave breezy bright brisk broken calm careful cheap cheerful chilly
clever cloudy clumsy cold common cosy crisp cruel curious damp dark deep dizzy dry dull dusty eager early
easy empty faint fancy fast fierce flat fragile free fresh friendly frozen funny gentle giant glad gloomy golden
grand great green grumpy happy hard harsh heavy hidden hollow honest huge humble hungry icy idle jolly keen kind
large late lazy light little lively lonely long loud lucky mellow merry mild misty modern narrow neat nervous
new noble noisy odd old pale patient plain polite poor proud purple quick quiet rapid rare rich rough round
royal rusty sad safe salty sharp shiny short shy silent silly simple sleepy slow small smooth soft solid sour
spare spicy steady steep sticky stormy strange strict strong sturdy sunny sweet swift tall tame tender thick
thin tidy tiny tough tricky true ugly vast warm wild wise witty young
""".split())

NOUNS = tuple("""
acorn anchor apple arrow attic badger bakery balloon bamboo banner barrel basket beacon beetle bell bench
bishop blanket bottle boulder bracelet branch bridge bucket butter button cabin cactus camel canal candle
canoe canyon carpet castle cathedral cellar chariot cherry chimney circus clock cobalt comet compass copper
cottage cotton crater crown cupboard curtain dagger daisy desert diamond dolphin donkey dragon drum eagle
easel elbow engine falcon feather fence fiddle fjord flute forest fossil fountain garden garlic geyser
ginger glacier glove goblet granite grape harbor harp hammock helmet hermit hedgehog honey horizon iceberg
island ivory jacket jigsaw jungle kayak kettle kitten ladder lagoon lantern lemon library lighthouse lizard
locket magnet mango marble meadow melon meteor mirror mitten monkey mosaic mountain muffin mustard needle
nickel notebook oasis octopus olive orange orchard orchid otter oyster paddle palace parcel parrot peach
pebble pelican pepper piano pillow pirate planet pocket pond potato puddle pumpkin puzzle quarry quill
rabbit raft raven ribbon river rocket saddle salmon satchel scarf scooter shovel silver skillet sparrow
spider spoon squirrel statue stone sunflower swan tablet teapot thistle thunder tiger timber tomato torch
tower trumpet tulip tunnel turtle umbrella valley velvet village violin volcano wagon walnut whistle willow
window winter wizard yogurt zebra
""".split())


def word_key(rng: random.Random) -> str:
    """An adjective-noun key like 'brave-lantern' (RULER's `words` needle type)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
    """A `digits`-digit number without a leading zero (RULER's `numbers` type: 7 digits)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def uuid4(rng: random.Random) -> str:
    """A version-4 UUID string from the seeded generator (RULER's `uuids` type)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


NEEDLE_TYPES = {"words": word_key, "numbers": number, "uuids": uuid4}


def distinct(rng: random.Random, kind: str, count: int, avoid: set[str] = frozenset()) -> list[str]:
    """`count` different draws of needle type `kind`, none of them in `avoid`."""
    out: list[str] = []
    while len(out) < count:
        value = NEEDLE_TYPES[kind](rng)
        if value not in out and value not in avoid:
            out.append(value)
    return out


def word_pool(texts: list[str]) -> list[str]:
    """The words of common-words extraction: the lists above plus every lower-case word of 3-12 letters in
    `texts`, sorted (so the pool, and every prompt drawn from it, is the same on every machine)."""
    found = {w for text in texts for w in re.findall(r"\b[a-z]{3,12}\b", text)}
    return sorted(found | set(ADJECTIVES) | set(NOUNS))

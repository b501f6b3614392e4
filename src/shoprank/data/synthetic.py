"""Deterministic synthetic marketplace: catalogue, queries, graded judgments, users.

The generator stands in for a real shop so the whole loop (train, evaluate, simulate traffic,
update) can run anywhere.  Everything is drawn from :func:`numpy.random.Generator` streams
spawned from one ``seed``, so the same arguments give identical frames on every machine.
Generation is vectorised per leaf category: 1M products take seconds, not minutes.

The world
---------
* **Taxonomy**: six top-level departments, three levels deep (``Electronics > Audio >
  Headphones``), 38 leaves.  Each leaf has a product noun (``headphones``), query-side
  synonyms that never appear in product text (``headset``, ``cans``), a set of attributes
  (colour, connectivity, size, material, ...) and a lognormal price distribution.
* **Products**: a leaf, a brand (brands belong to the mid-level category, Zipf-popular, each
  with a price premium), attribute values, a price and a listing time.  Titles and
  descriptions are rendered from several templates with adjectives, model codes, attribute
  phrases and price-tier phrases ("Great value for everyday use.", "Premium build
  quality."), so what decides relevance is readable from the text but not always with the
  words shoppers type.  Some listings also name other variants ("Also available in red."),
  neighbouring products ("Pairs well with any smartphone.") or stuff keywords ("Keywords:
  earbuds, headphones, red, wired."): words a lexical matcher takes at face value and a
  fine-tuned model can learn to discount.
  ``attributes`` is the JSON object of the product's attribute values.
* **Cold start**: ``new_product_fraction`` of the products are listed on one of the
  ``new_product_days`` days *after* ``start``; :meth:`Marketplace.catalog_for_day` grows day
  by day.  Human judgments only cover the products that exist on ``start``.
* **Queries** are derived from a real product's attributes: ``red wireless headphones``,
  ``aurex headphones``, ``cheap running shoes``, ``t-shirt size m``.  A fraction use a
  synonym (``couch`` for a sofa, ``bluetooth`` for wireless, ``affordable`` for cheap) or
  the other grammatical number (``laptops``, ``headphone``), and a fraction carry a typo
  (``headpohnes``).  Frequencies are Zipf-like over a rank that puts
  short queries first, so head / torso / tail slices exist.
* **Hidden relevance** (:meth:`Marketplace.true_relevance`), in [0, 1]:

  - same leaf:  ``0.5 + 0.5 * satisfied / constraints`` where the constraints are the
    query's attribute values, brand and price intent (cheap = bottom 30% of the leaf's
    prices, premium = top 30%); an unconstrained query ("headphones") scores 1.0;
  - same mid-level category (a complement or near miss): 0.3;
  - same department: 0.1; anything else: 0.0;
  - plus Gaussian noise (sd 0.06) that is a pure function of (seed, query, product), then
    clipped to [0, 1].

* **Grades** (ESCI-compatible, see ``contracts.GRADES``): 3 exact if relevance >= 0.875,
  2 substitute if >= 0.42, 1 complement if >= 0.2, else 0 irrelevant.  So a product of the
  right type that matches every constraint is exact, one of the right type that misses some
  is a substitute, one from a neighbouring leaf is a complement.
* **Judgments** per query (~20-40 at the default size; the realistic profile differs, see
  "Profiles"): the top few products of the target leaf by hidden relevance (positives), hard
  negatives from the same leaf and from sibling leaves, and random negatives from the whole
  catalogue; ``source = 'human'``.
* **Users** have preferred brands (within a preferred department), a price sensitivity in
  [0, 1] and an activity level; the traffic simulator (``shoprank.data.simulator``) uses them.

Profiles
--------
``generate_marketplace(..., profile=...)`` (knobs in ``PROFILES``):

* ``"default"``: the world above, byte-identical to what it was before profiles existed
  (same seed, same frames).  Judgment lists are built for training signal: ~20-40 per query,
  about a third of them grade 0 (hard and random negatives).
* ``"realistic"``: judgment lists that look like public e-commerce relevance sets (Amazon
  ESCI, Wayfair WANDS, Home Depot): a human-graded sample of a search engine's top results,
  so mostly relevant, with the off-topic products a lexical engine lets through.

  - **Accessories and lexical distractors.**  ``ACCESSORY_LEAVES`` (ear pads, laptop sleeves,
    screen protectors, insoles, pan lids, pillowcases, ... 31 leaves, ~20% of the products)
    plus the phone cases and chargers are listed with titles that name a real product they
    fit, its brand, model code and attributes: "Ear Pads Compatible with Aurex KX4521 Black
    Wireless Headphones", "Replacement Blender Jar for Dexa Countertop 1000W Blender".  A
    description sentence repeats it ("Compatible with the Aurex KX4521 and other Aurex
    headphones."), and 6% of all listings spam other departments' nouns ("Popular searches:
    sunglasses, yoga mat.").  Hidden relevance: an accessory-only leaf and a product of
    another leaf of its mid-level category are ``ACCESSORY_RELEVANCE`` (0.12) to each other's
    queries (mostly grade 0, about one in ten a complement by noise); phone cases and
    chargers stay siblings of smartphones (0.3, complements), as in the default world.
  - **Model codes.**  Products of one (leaf, brand) come in model lines of ~1.7 variants
    sharing a code ("KX4521", "QB730N"; ``GroundTruth.model`` / ``model_codes``), and every
    title carries it.  ~10% of the queries name one ("kx4521", "aurex kx4521", "aurex kx-4521
    headphones": a quarter typed split at the letters, where BM25 misses the token); the model
    line is one more constraint of the hidden relevance (the line's variants are exact, other
    products of the leaf substitutes).
  - **Queries** name the brand more often (``brand_query_rate`` 0.2 extra), use fewer
    synonyms (0.12; inflection 0.1) and typos (0.08), since real shoppers mostly type the
    catalogue's words; accessories are queried half as often as products, and a brand in an
    accessory query is the brand of the product it fits ("aurex ear pads";
    ``GroundTruth.match_brand``).
  - **Judgments**: 8-20 per query from a hybrid engine over the catalogue of the start day:
    ~60% sampled from the top 30 of BM25 (title boosted, brand, category leaf, description;
    catalogue statistics), the rest from the top 30 of the query's leaf by hidden relevance
    plus noise (the engine's semantic side), both favouring the first ranks; the engine's best
    semantic result is always judged.  Grades come from the hidden relevance as everywhere.
    At 1500 products and 600 queries: grade 0 ~14%, 1 ~7%, 2 ~44%, 3 ~34%; ~14 judgments per
    query; every query has a grade >= 2.  BM25 over the judged products plus 20 random
    catalogue products reaches NDCG@10 ~0.84 there, with a grade-0 product in its top 10 for
    about half the queries (``bench/realistic_bm25.py``).

The ground truth (:class:`GroundTruth`) lives on the :class:`Marketplace` for the simulator
and for tests.  Models and pipelines must only read the contract frames.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from shoprank.data.contracts import CATALOG, JUDGMENTS, QUERIES

log = logging.getLogger(__name__)

DAY_US = 86_400 * 1_000_000

# Hidden relevance model (see the module docstring).
LEAF_BASE = 0.5
SIBLING_RELEVANCE = 0.3
SAME_TOP_RELEVANCE = 0.1
# An accessory (realistic profile) for a query of a neighbouring leaf, e.g. ear pads for a
# headphones query, and the other way round: mostly grade 0, about one in ten a complement.
ACCESSORY_RELEVANCE = 0.12
NOISE_SD = 0.06
# Lower bounds of grades 1, 2, 3 on the relevance scale.
GRADE_THRESHOLDS = (0.2, 0.42, 0.875)
# Price tiers within a leaf: bottom / top share of the leaf's price distribution.
CHEAP_PCT, PREMIUM_PCT = 0.30, 0.70
PRICE_NONE, PRICE_CHEAP, PRICE_PREMIUM = 0, 1, 2


# ---------------------------------------------------------------------------------------
# Taxonomy
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attr:
    """One attribute of a leaf.

    ``values`` are what the JSON ``attributes`` column holds; ``fmt`` renders a value as
    text (``"size {v}"``); ``pre`` puts it before the noun in titles and queries;
    ``sentences`` are description templates (``{t}`` text form, ``{T}`` capitalised).
    """

    key: str
    values: tuple[str, ...]
    fmt: str = "{v}"
    pre: bool = True
    sentences: tuple[str, ...] = ("{T}.",)


@dataclass(frozen=True)
class Leaf:
    path: str
    noun: str
    synonyms: tuple[str, ...]
    attrs: tuple[Attr, ...]
    price_median: float
    price_sigma: float = 0.45
    weight: float = 1.0
    fits: str | None = None  # accessories: path of the leaf whose products they fit (realistic profile)

    @property
    def top(self) -> str:
        return self.path.split(" > ")[0]

    @property
    def mid(self) -> str:
        return " > ".join(self.path.split(" > ")[:2])


def _colour(*values: str) -> Attr:
    return Attr("colour", values, sentences=("Finished in {t}.", "Colour: {t}.", "Available in {t}."))


def _material(*values: str, key: str = "material", label: str = "Material") -> Attr:
    return Attr(key, values, sentences=("Made from {t}.", label + ": {t}.", "{T} construction."))


def _size(*values: str, fmt: str = "size {v}", key: str = "size", pre: bool = False) -> Attr:
    return Attr(key, values, fmt=fmt, pre=pre, sentences=("{T}.", "Offered in {t}.", "Available in {t}."))


def _gender(*values: str) -> Attr:
    values = values or ("men's", "women's", "kids'")
    return Attr("gender", values, sentences=("Designed for {t} wear.", "Cut for {t} sizing.", "Fit: {t}."))


def _feature(key: str, *values: str, label: str, pre: bool = True, fmt: str = "{v}") -> Attr:
    return Attr(key, values, fmt=fmt, pre=pre, sentences=("{T}.", label + ": {t}.", "Features {t}."))


_COLOURS = ("black", "white", "grey", "navy", "red", "blue", "green", "pink", "beige", "brown", "yellow", "purple")
_SHOE_SIZES = tuple(str(s) for s in range(5, 13))

LEAVES: tuple[Leaf, ...] = (
    # Electronics
    Leaf("Electronics > Audio > Headphones", "headphones", ("headset", "cans"),
         (_colour("black", "white", "silver", "blue", "red", "pink"),
          _feature("connectivity", "wireless", "wired", label="Connectivity"),
          _feature("style", "over-ear", "on-ear", label="Style"),
          _feature("feature", "noise cancelling", "foldable", "studio", label="Feature")), 90, weight=1.4),
    Leaf("Electronics > Audio > Earbuds", "earbuds", ("earphones", "in ear buds"),
         (_colour("black", "white", "blue", "pink"),
          _feature("connectivity", "wireless", "wired", label="Connectivity"),
          _feature("feature", "noise cancelling", "sweatproof", "with charging case", label="Feature",
                   pre=False)), 60, weight=1.2),
    Leaf("Electronics > Audio > Speakers", "bluetooth speaker", ("portable speaker", "boombox"),
         (_colour("black", "blue", "red", "grey"),
          _feature("feature", "waterproof", "rugged", "with party lights", label="Feature"),
          _feature("power", "10W", "20W", "40W", label="Output", pre=False)), 70),
    Leaf("Electronics > Computers > Laptops", "laptop", ("notebook computer", "notebook pc"),
         (_size("13", "14", "15", "16", fmt="{v} inch", key="screen_size", pre=True),
          _feature("memory", "8GB RAM", "16GB RAM", "32GB RAM", label="Memory", pre=False),
          _feature("storage", "256GB SSD", "512GB SSD", "1TB SSD", label="Storage", pre=False),
          _colour("silver", "grey", "black")), 850, 0.4, weight=1.2),
    Leaf("Electronics > Computers > Monitors", "monitor", ("computer screen", "display screen"),
         (_size("24", "27", "32", fmt="{v} inch", key="screen_size", pre=True),
          _feature("resolution", "1080p", "1440p", "4K", label="Resolution"),
          _feature("panel", "curved", "IPS", "gaming", label="Panel")), 250),
    Leaf("Electronics > Computers > Keyboards", "keyboard", ("keeb", "typing board"),
         (_feature("switch", "mechanical", "membrane", label="Switches"),
          _feature("connectivity", "wireless", "wired", label="Connectivity"),
          _feature("layout", "full size", "tenkeyless", "compact", label="Layout"),
          _colour("black", "white", "pink")), 70),
    Leaf("Electronics > Phones > Smartphones", "smartphone", ("cell phone", "mobile phone"),
         (_feature("storage", "64GB", "128GB", "256GB", "512GB", label="Storage", pre=False),
          _colour("black", "white", "blue", "green", "purple"),
          _feature("network", "5G", "4G", label="Network")), 450, 0.6, weight=1.3),
    Leaf("Electronics > Phones > Phone Cases", "phone case", ("phone cover", "mobile cover"),
         (_material("silicone", "leather", "clear plastic", "rugged polycarbonate"),
          _colour("black", "clear", "red", "blue", "pink", "green")), 15, 0.4,
         fits="Electronics > Phones > Smartphones"),
    Leaf("Electronics > Phones > Chargers", "charger", ("charging brick", "power adapter"),
         (_feature("connector", "USB-C", "Lightning", "micro USB", label="Connector"),
          _feature("power", "20W", "45W", "65W", label="Output"),
          _colour("black", "white")), 20, 0.4, fits="Electronics > Phones > Smartphones"),
    # Fashion
    Leaf("Fashion > Shoes > Running Shoes", "running shoes", ("sneakers", "trainers", "jogging shoes"),
         (_gender(), _colour(*_COLOURS[:9]), _material("mesh", "knit", "synthetic"),
          _size(*_SHOE_SIZES)), 85, weight=1.6),
    Leaf("Fashion > Shoes > Boots", "boots", ("booties", "wellies"),
         (_gender(), _colour("black", "brown", "beige", "grey"), _material("leather", "suede", "rubber"),
          _feature("feature", "waterproof", "insulated", "steel toe", label="Feature"), _size(*_SHOE_SIZES)), 110),
    Leaf("Fashion > Shoes > Sandals", "sandals", ("flip flops", "slides"),
         (_gender(), _colour("black", "brown", "white", "beige", "blue"), _material("leather", "rubber", "cork"),
          _size(*_SHOE_SIZES)), 35),
    Leaf("Fashion > Clothing > T-Shirts", "t-shirt", ("tee", "tshirt", "tee shirt"),
         (_gender(), _colour(*_COLOURS), _material("cotton", "organic cotton", "polyester", "linen"),
          _feature("fit", "slim fit", "regular fit", "oversized", label="Fit"),
          _size("XS", "S", "M", "L", "XL", "XXL")), 20, 0.4, weight=1.5),
    Leaf("Fashion > Clothing > Jackets", "jacket", ("coat", "windbreaker", "anorak"),
         (_gender(), _colour("black", "navy", "green", "grey", "red", "beige"),
          _material("down", "fleece", "leather", "nylon"),
          _feature("feature", "waterproof", "hooded", "packable", label="Feature"),
          _size("XS", "S", "M", "L", "XL", "XXL")), 120),
    Leaf("Fashion > Clothing > Jeans", "jeans", ("denim pants", "denims"),
         (_gender(), _feature("fit", "skinny", "straight", "relaxed", "bootcut", label="Fit"),
          _colour("blue", "black", "grey", "light blue"), _size("28", "30", "32", "34", "36", fmt="waist {v}")), 60),
    Leaf("Fashion > Accessories > Backpacks", "backpack", ("rucksack", "bookbag", "daypack"),
         (_colour("black", "grey", "navy", "green", "red"), _material("nylon", "canvas", "leather", "polyester"),
          _size("15", "20", "30", fmt="{v}L", key="capacity", pre=True),
          _feature("feature", "waterproof", "anti-theft", "with laptop sleeve", label="Feature", pre=False)), 55),
    Leaf("Fashion > Accessories > Watches", "watch", ("wristwatch", "timepiece"),
         (_gender("men's", "women's", "unisex"), _feature("type", "analog", "digital", "chronograph", label="Type"),
          _material("leather", "stainless steel", "silicone", key="strap", label="Strap"),
          _colour("black", "silver", "gold", "rose gold")), 150, 0.7),
    Leaf("Fashion > Accessories > Sunglasses", "sunglasses", ("shades", "sunnies"),
         (_gender("men's", "women's", "unisex"),
          _feature("style", "aviator", "wayfarer", "round", "sport", label="Style"),
          _feature("lens", "polarized", "mirrored", "gradient", label="Lens"),
          _colour("black", "tortoise", "gold", "silver")), 40),
    # Home & Kitchen
    Leaf("Home & Kitchen > Kitchen Appliances > Coffee Makers", "coffee maker", ("coffee machine", "brewer"),
         (_feature("type", "drip", "espresso", "pod", "pour-over", label="Type"),
          _size("4", "8", "12", fmt="{v}-cup", key="capacity", pre=True),
          _colour("black", "stainless", "white", "red")), 80),
    Leaf("Home & Kitchen > Kitchen Appliances > Blenders", "blender", ("smoothie maker", "liquidiser"),
         (_feature("type", "countertop", "personal", "immersion", label="Type"),
          _feature("power", "600W", "1000W", "1500W", label="Power"),
          _colour("black", "white", "red", "silver")), 70),
    Leaf("Home & Kitchen > Cookware > Frying Pans", "frying pan", ("skillet", "fry pan", "saute pan"),
         (_material("cast iron", "stainless steel", "nonstick", "copper"),
          _size("8", "10", "12", fmt="{v} inch", pre=True),
          _feature("feature", "induction ready", "oven safe", "dishwasher safe", label="Feature", pre=False)), 35),
    Leaf("Home & Kitchen > Cookware > Saucepans", "saucepan", ("sauce pot", "cooking pot"),
         (_material("stainless steel", "nonstick", "copper", "enamelled cast iron"),
          _size("1", "2", "3", fmt="{v} quart", key="capacity", pre=True),
          _feature("feature", "with lid", "induction ready", label="Feature", pre=False)), 30),
    Leaf("Home & Kitchen > Cookware > Kitchen Knives", "chef knife", ("cooks knife", "santoku"),
         (_material("stainless steel", "damascus steel", "ceramic", key="blade", label="Blade"),
          _size("6", "8", "10", fmt="{v} inch", pre=True),
          _colour("black", "wood", "white")), 45),
    Leaf("Home & Kitchen > Furniture > Sofas", "sofa", ("couch", "settee", "loveseat"),
         (_colour("grey", "beige", "navy", "green", "brown", "black"),
          _material("velvet", "linen", "leather", "fabric"),
          _size("2-seater", "3-seater", "corner", fmt="{v}", pre=True)), 700, 0.5),
    Leaf("Home & Kitchen > Furniture > Office Chairs", "office chair", ("desk chair", "computer chair", "task chair"),
         (_colour("black", "grey", "white", "blue"), _material("mesh", "leather", "fabric"),
          _feature("feature", "ergonomic", "reclining", "armless", label="Design")), 180),
    Leaf("Home & Kitchen > Furniture > Desks", "desk", ("writing table", "workstation"),
         (_material("oak", "walnut", "pine", "metal", "glass"),
          _feature("type", "standing", "corner", "compact", label="Type"),
          _colour("white", "black", "natural")), 250),
    Leaf("Home & Kitchen > Bedding > Pillows", "pillow", ("bed pillow", "sleeping cushion"),
         (_material("memory foam", "down", "feather", "cooling gel", key="fill", label="Fill"),
          _feature("firmness", "soft", "medium", "firm", label="Firmness"),
          _size("standard", "queen", "king", fmt="{v} size", pre=True)), 35),
    Leaf("Home & Kitchen > Bedding > Duvets", "duvet", ("comforter", "quilt", "doona"),
         (_material("down", "microfiber", "wool", key="fill", label="Fill"),
          _feature("warmth", "lightweight", "all-season", "winter", label="Warmth"),
          _size("single", "double", "queen", "king", fmt="{v} size", pre=True)), 90),
    # Sports & Outdoors
    Leaf("Sports & Outdoors > Fitness > Yoga Mats", "yoga mat", ("exercise mat", "workout mat", "pilates mat"),
         (_colour("purple", "blue", "black", "pink", "green", "grey"),
          _material("TPE", "natural rubber", "cork", "PVC"),
          _size("4", "6", "10", fmt="{v}mm", key="thickness", pre=True)), 30),
    Leaf("Sports & Outdoors > Fitness > Dumbbells", "dumbbells", ("hand weights", "free weights"),
         (_size("5", "10", "15", "20", "25", fmt="{v} lb", key="weight", pre=True),
          _feature("type", "adjustable", "hex", "neoprene", label="Type")), 45),
    Leaf("Sports & Outdoors > Camping > Tents", "tent", ("camping shelter", "bivouac"),
         (_size("1", "2", "4", "6", fmt="{v}-person", key="capacity", pre=True),
          _feature("season", "3-season", "4-season", label="Season"),
          _colour("green", "orange", "grey", "blue")), 160),
    Leaf("Sports & Outdoors > Camping > Sleeping Bags", "sleeping bag", ("sleep sack", "bedroll"),
         (_material("down", "synthetic", key="fill", label="Fill"),
          _feature("rating", "summer", "3-season", "winter", label="Rating"),
          _feature("shape", "mummy", "rectangular", label="Shape"), _colour("green", "blue", "orange", "black")), 70),
    Leaf("Sports & Outdoors > Cycling > Bikes", "bike", ("bicycle", "cycle"),
         (_feature("type", "mountain", "road", "hybrid", "electric", label="Type"),
          _size("small", "medium", "large", fmt="{v} frame", key="frame_size"),
          _colour("black", "red", "blue", "white", "green")), 600, 0.6),
    Leaf("Sports & Outdoors > Cycling > Bike Helmets", "bike helmet", ("cycling helmet", "bicycle helmet"),
         (_gender("adult", "kids'"), _colour("black", "white", "red", "blue"),
          _feature("feature", "MIPS", "with visor", "with rear light", label="Feature", pre=False)), 60),
    # Beauty
    Leaf("Beauty > Skincare > Moisturizers", "moisturizer", ("face cream", "moisturiser", "hydrating lotion"),
         (_feature("skin", "dry", "oily", "sensitive", "combination", label="Skin type", pre=False, fmt="for {v} skin"),
          _feature("feature", "fragrance-free", "vegan", "anti-aging", label="Formula"),
          _size("50", "100", fmt="{v}ml")), 25),
    Leaf("Beauty > Skincare > Sunscreen", "sunscreen", ("sunblock", "sun cream"),
         (_feature("spf", "30", "50", "70", label="Protection", fmt="SPF {v}"),
          _feature("form", "lotion", "spray", "stick", label="Form", pre=False),
          _feature("feature", "water resistant", "mineral", "reef safe", label="Formula")), 15, 0.4),
    Leaf("Beauty > Hair Care > Shampoo", "shampoo", ("hair wash", "hair cleanser"),
         (_feature("hair", "dry", "oily", "curly", "colored", label="Hair type", pre=False, fmt="for {v} hair"),
          _feature("feature", "sulfate-free", "anti-dandruff", "volumizing", label="Formula"),
          _size("250", "500", "1000", fmt="{v}ml")), 12, 0.4),
    Leaf("Beauty > Hair Care > Hair Dryers", "hair dryer", ("blow dryer", "hairdryer", "blowdryer"),
         (_feature("power", "1200W", "1800W", "2200W", label="Power"),
          _feature("feature", "ionic", "travel", "with diffuser", label="Feature"),
          _colour("black", "pink", "white", "rose gold")), 60),
    # Toys & Games
    Leaf("Toys & Games > Toys > Building Blocks", "building blocks", ("construction set", "building bricks"),
         (_feature("theme", "city", "space", "castle", "vehicles", label="Theme"),
          _size("100", "500", "1000", fmt="{v} pieces", key="pieces"),
          _feature("age", "3+", "6+", "8+", label="Age", pre=False, fmt="ages {v}")), 35),
    Leaf("Toys & Games > Toys > Plush Toys", "plush toy", ("stuffed animal", "soft toy", "teddy"),
         (_feature("animal", "bear", "bunny", "unicorn", "dinosaur", "cat", label="Animal"),
          _size("small", "medium", "large", "giant", fmt="{v}", pre=True),
          _colour("brown", "white", "pink", "grey", "blue")), 20),
    Leaf("Toys & Games > Games > Board Games", "board game", ("tabletop game", "family game"),
         (_feature("type", "strategy", "party", "cooperative", "trivia", label="Type"),
          _feature("players", "2", "2-4", "2-6", label="Players", pre=False, fmt="for {v} players"),
          _feature("age", "8+", "12+", "14+", label="Age", pre=False, fmt="ages {v}")), 30),
)
N_CORE_LEAVES = len(LEAVES)  # the default profile only lists products of these leaves

# Accessories that name the product they fit ("Ear Pads for Aurex KX4521 Headphones"): only
# the realistic profile lists them.  Each sits in the mid-level category of the leaf it fits.
ACCESSORY_LEAVES: tuple[Leaf, ...] = (
    Leaf("Electronics > Audio > Headphone Accessories", "ear pads", ("earpads", "ear cushions"),
         (_colour("black", "grey", "brown", "white"),
          _material("protein leather", "velour", "memory foam", "sheepskin")), 18, 0.4, weight=0.5,
         fits="Electronics > Audio > Headphones"),
    Leaf("Electronics > Audio > Earbud Accessories", "ear tips", ("eartips", "ear gels"),
         (_size("S", "M", "L", fmt="size {v}"), _material("silicone", "memory foam", "hybrid silicone"),
          _colour("black", "white", "grey")), 12, 0.4, weight=0.4, fits="Electronics > Audio > Earbuds"),
    Leaf("Electronics > Audio > Speaker Accessories", "speaker case", ("speaker bag", "speaker pouch"),
         (_colour("black", "grey", "blue", "red"), _material("hard shell", "EVA", "silicone")), 15, 0.4, weight=0.4,
         fits="Electronics > Audio > Speakers"),
    Leaf("Electronics > Computers > Laptop Accessories", "laptop sleeve", ("laptop pouch", "notebook bag"),
         (_size("13", "14", "15", "16", fmt="{v} inch", key="screen_size", pre=True),
          _material("neoprene", "felt", "leather", "nylon"), _colour("black", "grey", "navy", "pink")), 22, 0.4,
         weight=0.5, fits="Electronics > Computers > Laptops"),
    Leaf("Electronics > Computers > Monitor Accessories", "monitor arm", ("monitor mount", "vesa mount"),
         (_feature("type", "single", "dual", "triple", label="Type"),
          _feature("mount", "clamp", "grommet", "freestanding", label="Mounting"),
          _colour("black", "white", "silver")), 60, weight=0.35, fits="Electronics > Computers > Monitors"),
    Leaf("Electronics > Computers > Keyboard Accessories", "keycaps", ("keycap set", "key caps"),
         (_material("PBT", "ABS", "double-shot PBT"),
          _feature("profile", "cherry profile", "OEM profile", "XDA profile", label="Profile"),
          _colour("black", "white", "pink", "blue")), 35, weight=0.35, fits="Electronics > Computers > Keyboards"),
    Leaf("Electronics > Phones > Screen Protectors", "screen protector", ("screen guard", "glass protector"),
         (_material("tempered glass", "privacy glass", "hydrogel film"),
          _feature("pack", "1-pack", "2-pack", "3-pack", label="Pack", pre=False)), 10, 0.4, weight=0.5,
         fits="Electronics > Phones > Smartphones"),
    Leaf("Fashion > Shoes > Shoe Care", "insoles", ("shoe inserts", "footbeds"),
         (_gender(), _material("gel", "memory foam", "cork"), _size(*_SHOE_SIZES)), 18, weight=0.4,
         fits="Fashion > Shoes > Running Shoes"),
    Leaf("Fashion > Shoes > Shoe Laces", "boot laces", ("bootlaces", "lace cords"),
         (_colour("black", "brown", "beige", "red"), _feature("type", "waxed", "round", "flat", label="Type"),
          _size("120cm", "150cm", "180cm", fmt="{v}", key="length", pre=False)), 8, weight=0.35,
         fits="Fashion > Shoes > Boots"),
    Leaf("Fashion > Accessories > Backpack Accessories", "backpack rain cover", ("pack cover", "rucksack cover"),
         (_size("15", "20", "30", fmt="{v}L", key="capacity", pre=True), _colour("black", "orange", "yellow", "green")),
         14, weight=0.35, fits="Fashion > Accessories > Backpacks"),
    Leaf("Fashion > Accessories > Watch Bands", "watch band", ("wristband", "watchband"),
         (_material("leather", "stainless steel", "silicone", "nylon"), _colour("black", "brown", "silver", "blue"),
          _size("18mm", "20mm", "22mm", fmt="{v}", key="width", pre=True)), 20, weight=0.4,
         fits="Fashion > Accessories > Watches"),
    Leaf("Fashion > Accessories > Eyewear Accessories", "sunglasses case", ("glasses pouch", "eyewear case"),
         (_material("hard shell", "leather", "microfiber"), _colour("black", "brown", "grey", "red")), 12,
         weight=0.3, fits="Fashion > Accessories > Sunglasses"),
    Leaf("Home & Kitchen > Kitchen Appliances > Coffee Accessories", "coffee filters", ("filter papers", "paper filters"),
         (_feature("type", "paper", "reusable mesh", "gold tone", label="Type"),
          _size("4", "8", "12", fmt="{v}-cup", key="capacity", pre=True)), 10, 0.4, weight=0.4,
         fits="Home & Kitchen > Kitchen Appliances > Coffee Makers"),
    Leaf("Home & Kitchen > Kitchen Appliances > Blender Parts", "blender jar", ("blender pitcher", "blender cup"),
         (_size("32oz", "48oz", "64oz", fmt="{v}", key="capacity", pre=True),
          _material("glass", "BPA-free plastic", "stainless steel")), 25, weight=0.3,
         fits="Home & Kitchen > Kitchen Appliances > Blenders"),
    Leaf("Home & Kitchen > Cookware > Cookware Accessories", "pan lid", ("skillet cover", "splatter guard"),
         (_material("tempered glass", "silicone", "stainless steel"),
          _size("8", "10", "12", fmt="{v} inch", pre=True)), 18, weight=0.4,
         fits="Home & Kitchen > Cookware > Frying Pans"),
    Leaf("Home & Kitchen > Cookware > Knife Care", "knife sharpener", ("whetstone", "honing rod"),
         (_feature("type", "pull-through", "electric", "sharpening stone", label="Type"),
          _colour("black", "grey", "red")), 25, weight=0.35, fits="Home & Kitchen > Cookware > Kitchen Knives"),
    Leaf("Home & Kitchen > Furniture > Chair Mats", "chair mat", ("floor protector", "carpet protector"),
         (_material("PVC", "polycarbonate", "bamboo"), _size("36x48", "46x60", fmt="{v} inch", key="size", pre=True)),
         40, weight=0.35, fits="Home & Kitchen > Furniture > Office Chairs"),
    Leaf("Home & Kitchen > Furniture > Desk Accessories", "desk organizer", ("desk tidy", "desktop organiser"),
         (_material("oak", "walnut", "metal", "acrylic"), _colour("white", "black", "natural")), 25, weight=0.4,
         fits="Home & Kitchen > Furniture > Desks"),
    Leaf("Home & Kitchen > Furniture > Furniture Covers", "sofa cover", ("slipcover", "couch protector"),
         (_colour("grey", "beige", "navy", "green", "brown", "black"),
          _material("stretch fabric", "velvet", "quilted fabric"),
          _size("2-seater", "3-seater", "corner", fmt="{v}", pre=True)), 35, weight=0.4,
         fits="Home & Kitchen > Furniture > Sofas"),
    Leaf("Home & Kitchen > Bedding > Bed Linen", "duvet cover", ("quilt cover", "comforter cover"),
         (_colour("white", "grey", "navy", "beige", "green"), _material("cotton", "linen", "microfiber", "satin"),
          _size("single", "double", "queen", "king", fmt="{v} size", pre=True)), 40, weight=0.5,
         fits="Home & Kitchen > Bedding > Duvets"),
    Leaf("Home & Kitchen > Bedding > Pillowcases", "pillowcase", ("pillow slip", "pillow sham"),
         (_colour("white", "grey", "navy", "pink", "beige"), _material("cotton", "silk", "satin", "linen"),
          _size("standard", "queen", "king", fmt="{v} size", pre=True)), 15, weight=0.45,
         fits="Home & Kitchen > Bedding > Pillows"),
    Leaf("Sports & Outdoors > Camping > Tent Accessories", "tent footprint", ("ground sheet", "groundsheet"),
         (_size("1", "2", "4", "6", fmt="{v}-person", key="capacity", pre=True), _colour("green", "grey", "orange")),
         30, weight=0.35, fits="Sports & Outdoors > Camping > Tents"),
    Leaf("Sports & Outdoors > Camping > Sleeping Bag Liners", "sleeping bag liner", ("sleep liner", "sack liner"),
         (_material("silk", "fleece", "cotton"), _feature("shape", "mummy", "rectangular", label="Shape"),
          _colour("green", "blue", "grey")), 30, weight=0.3, fits="Sports & Outdoors > Camping > Sleeping Bags"),
    Leaf("Sports & Outdoors > Cycling > Bike Accessories", "bike lock", ("cycle lock", "u lock"),
         (_feature("type", "u-lock", "chain", "cable", "folding", label="Type"), _colour("black", "red", "yellow")),
         35, weight=0.45, fits="Sports & Outdoors > Cycling > Bikes"),
    Leaf("Sports & Outdoors > Fitness > Weight Storage", "dumbbell rack", ("weight rack", "weight stand"),
         (_feature("type", "2-tier", "3-tier", "a-frame", label="Type"), _colour("black", "grey")), 70, weight=0.3,
         fits="Sports & Outdoors > Fitness > Dumbbells"),
    Leaf("Sports & Outdoors > Fitness > Fitness Accessories", "yoga mat strap", ("mat sling", "mat carrier"),
         (_colour("purple", "blue", "black", "pink"), _material("cotton", "nylon", "hemp")), 12, weight=0.35,
         fits="Sports & Outdoors > Fitness > Yoga Mats"),
    Leaf("Beauty > Hair Care > Scalp Care", "shampoo brush", ("scalp massager", "scalp scrubber"),
         (_colour("black", "pink", "green", "purple"), _material("silicone", "bamboo", key="bristles", label="Bristles")),
         8, weight=0.3, fits="Beauty > Hair Care > Shampoo"),
    Leaf("Beauty > Skincare > Skincare Tools", "sunscreen pouch", ("sun cream case", "lotion pouch"),
         (_colour("black", "pink", "blue", "clear"), _material("silicone", "nylon")), 8, weight=0.25,
         fits="Beauty > Skincare > Sunscreen"),
    Leaf("Beauty > Hair Care > Hair Tool Accessories", "diffuser attachment", ("dryer nozzle", "diffuser nozzle"),
         (_colour("black", "white", "pink"),), 15, weight=0.3, fits="Beauty > Hair Care > Hair Dryers"),
    Leaf("Toys & Games > Toys > Toy Storage", "building blocks storage box", ("brick organizer", "toy bin"),
         (_size("small", "medium", "large", fmt="{v}", pre=True), _colour("red", "blue", "clear", "yellow")), 20,
         weight=0.3, fits="Toys & Games > Toys > Building Blocks"),
    Leaf("Toys & Games > Games > Game Accessories", "card sleeves", ("card protectors", "sleeve pack"),
         (_size("50", "100", "200", fmt="{v} count", key="count", pre=True),
          _feature("finish", "matte", "clear", label="Finish")), 8, weight=0.25,
         fits="Toys & Games > Games > Board Games"),
)
LEAVES = LEAVES + ACCESSORY_LEAVES

# Query-side synonyms of attribute text forms (products never use these words).
VALUE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "grey": ("gray",), "wireless": ("bluetooth", "cordless"), "men's": ("mens", "for men"),
    "women's": ("womens", "for women", "ladies"), "kids'": ("kids", "childrens"),
    "noise cancelling": ("anc", "noise canceling"), "nonstick": ("non-stick", "teflon"),
    "4k": ("uhd", "ultra hd"), "1080p": ("full hd", "fhd"), "1440p": ("qhd", "2k"),
    "polarized": ("polarised", "anti glare"), "sulfate-free": ("sulphate free", "no sulfates"),
    "fragrance-free": ("unscented", "no fragrance"), "analog": ("analogue",), "navy": ("dark blue",),
    "beige": ("cream",), "waterproof": ("rainproof",), "memory foam": ("viscoelastic",),
    "cast iron": ("cast-iron",), "ergonomic": ("back support",), "electric": ("ebike", "e-bike"),
    "mechanical": ("clicky",), "sweatproof": ("sweat resistant",), "tenkeyless": ("tkl",),
}

PRICE_QUERY_WORDS = {
    PRICE_CHEAP: ("cheap", "affordable", "budget", "inexpensive", "low cost"),
    PRICE_PREMIUM: ("premium", "luxury", "high end", "top rated"),
}
PRICE_PHRASES = {
    PRICE_CHEAP: ("Great value for everyday use.", "A wallet-friendly choice.", "Entry-level pick at a fair price.",
                  "Budget-friendly without cutting corners."),
    PRICE_PREMIUM: ("Premium build quality.", "A flagship, top-of-the-line model.", "Professional-grade performance.",
                    "Luxury finish throughout."),
}
ADJECTIVES = ("Classic", "Modern", "Lightweight", "Compact", "Everyday", "Essential", "Sleek", "Durable",
              "Versatile", "Ultra", "Signature", "Original", "Heritage", "Urban", "Active", "Smart")
MODEL_PREFIXES = ("X", "Z", "Pro ", "Air ", "Max ", "S", "Q", "One ", "Neo ", "Flex ", "Go ", "V")
FILLERS = {
    "Electronics": ("Quick setup with the companion app.", "Compatible with most devices.", "Energy efficient design."),
    "Fashion": ("Comfortable fit for all-day wear.", "Designed for comfort and style.", "True to size."),
    "Home & Kitchen": ("Easy to clean.", "Fits any home decor.", "Built for daily use."),
    "Sports & Outdoors": ("Built for the outdoors.", "Tested by athletes.", "Ready for any adventure."),
    "Beauty": ("Dermatologist tested.", "Cruelty-free formula.", "Suitable for daily use."),
    "Toys & Games": ("Great gift for kids and families.", "Meets toy safety standards.", "Hours of fun."),
}
VARIANT_MENTIONS = (" Also available in {t}.", " See our {t} version too.")
COMPLEMENT_MENTIONS = (" Pairs well with any {noun}.", " A great match for your {noun}.")
CLOSINGS = ("Ships in recyclable packaging.", "Backed by a 2-year warranty.", "Free returns within 30 days.",
            "Order today and enjoy fast delivery.")
INTROS = (
    "{brand}'s {adj} {noun} for everyday use.",
    "Meet the {brand} {model}: {a_adj} take on the classic {noun}.",
    "This {adj} {noun} from {brand} is built to last.",
    "{brand} {noun} designed for comfort and reliability.",
)
TITLES = (
    "{brand} {adj} {pre}{noun}{post}",
    "{brand} {model} {pre}{noun}{post}",
    "{adj} {pre}{noun} by {brand}{post}",
    "{brand} {pre}{noun} {model}{post}",
)
_BRAND_HEADS = ("Aur", "Bel", "Cor", "Dyn", "Elv", "Fen", "Gal", "Hal", "Ion", "Jov", "Kel", "Lum", "Mar", "Nov",
                "Orb", "Pol", "Quin", "Rav", "Sol", "Tor", "Ulm", "Ver", "Wex", "Zen", "Arc", "Brio", "Cal", "Dex")
_BRAND_TAILS = ("ex", "a", "io", "on", "ix", "ora", "us", "ity", "ent", "is", "ar", "o", "wave", "line", "craft")

# Departments and mid-level categories come from the core leaves (accessories add none), so
# the brand vocabulary and the default profile do not depend on the accessory leaves.
TOPS: tuple[str, ...] = tuple(dict.fromkeys(leaf.top for leaf in LEAVES[:N_CORE_LEAVES]))
MIDS: tuple[str, ...] = tuple(dict.fromkeys(leaf.mid for leaf in LEAVES[:N_CORE_LEAVES]))
LEAF_TOP = np.array([TOPS.index(leaf.top) for leaf in LEAVES], dtype=np.int16)
LEAF_MID = np.array([MIDS.index(leaf.mid) for leaf in LEAVES], dtype=np.int16)
MAX_SLOTS = max(len(leaf.attrs) for leaf in LEAVES[:N_CORE_LEAVES])
LEAF_INDEX = {leaf.path: i for i, leaf in enumerate(LEAVES)}
# leaf -> leaf index whose products it fits (-1: not an accessory); accessory-only leaves
LEAF_FITS = np.array([LEAF_INDEX[leaf.fits] if leaf.fits else -1 for leaf in LEAVES], dtype=np.int16)
LEAF_ACCESSORY = np.arange(len(LEAVES)) >= N_CORE_LEAVES


def _make_brands() -> tuple[tuple[str, ...], np.ndarray]:
    """Fixed brand vocabulary (independent of the seed): 5-8 brands per mid-level category."""
    rng = np.random.default_rng(20261101)
    names: list[str] = []
    mids: list[int] = []
    used: set[str] = set()
    for m in range(len(MIDS)):
        for _ in range(int(rng.integers(5, 9))):
            while True:
                name = _BRAND_HEADS[rng.integers(len(_BRAND_HEADS))] + _BRAND_TAILS[rng.integers(len(_BRAND_TAILS))]
                if name not in used:
                    break
            used.add(name)
            names.append(name)
            mids.append(m)
    return tuple(names), np.array(mids, dtype=np.int16)


BRANDS, BRAND_MID = _make_brands()


def _check_vocabulary() -> None:
    if len({leaf.path for leaf in LEAVES}) != len(LEAVES):
        raise AssertionError("leaf paths must be unique")
    for leaf in ACCESSORY_LEAVES:
        if len(leaf.attrs) > MAX_SLOTS or not leaf.fits or LEAVES[LEAF_INDEX[leaf.fits]].mid != leaf.mid:
            raise AssertionError(f"accessory leaf {leaf.path} must fit a core leaf of its mid-level category")
    for leaf in LEAVES:
        for a in leaf.attrs:
            for v in a.values:
                if '"' in v or "\\" in v:  # attributes JSON is assembled by concatenation
                    raise AssertionError(f"attribute value {v!r} must not contain quotes or backslashes")


_check_vocabulary()


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def _as_date(day: dt.date | dt.datetime | str) -> dt.date:
    if isinstance(day, str):
        return dt.date.fromisoformat(day)
    if isinstance(day, dt.datetime):
        return day.date()
    return day


def day_start_us(day: dt.date | dt.datetime | str) -> int:
    """Microseconds since the epoch at 00:00 UTC of ``day``."""
    d = _as_date(day)
    return (d - dt.date(1970, 1, 1)).days * DAY_US


def _cap_words(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


def _cap_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _obj(values: Sequence[str]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def _render(template: str, fields: Mapping[str, Any], m: int) -> np.ndarray:
    """Vectorised ``str.format``: fields are scalars or object arrays of length ``m``."""
    out: Any = np.full(m, "", dtype=object)
    for literal, name, _, _ in Formatter().parse(template):
        if literal:
            out = out + literal
        if name is not None:
            out = out + fields[name]
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def pair_noise(key: int, qi: int, pidx: np.ndarray) -> np.ndarray:
    """Standard-normal noise that is a pure function of (key, query index, product index)."""
    qh = _splitmix64(np.array([(key ^ (int(qi) * 0x9E3779B1)) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h1 = _splitmix64(np.asarray(pidx, dtype=np.uint64) ^ qh)
    h2 = _splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def relevance_to_grade(relevance: np.ndarray) -> np.ndarray:
    """Map hidden relevance in [0, 1] to grades 0..3 (see ``GRADE_THRESHOLDS``)."""
    return np.searchsorted(np.asarray(GRADE_THRESHOLDS), np.asarray(relevance, dtype=float), side="right").astype(
        np.int64
    )


_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _row in _KEYBOARD_ROWS:
    for _i, _ch in enumerate(_row):
        _NEIGHBOURS[_ch] = _row[max(0, _i - 1) : _i] + _row[_i + 1 : _i + 2]


def _inflect(noun: str) -> str:
    """Singular <-> plural of the last word ("headphones" -> "headphone", "laptop" -> "laptops")."""
    head, _, w = noun.rpartition(" ")
    irregular = {"knife": "knives", "knives": "knife"}
    if w in irregular:
        w = irregular[w]
    elif w.endswith(("ches", "shes", "sses", "xes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    elif w.endswith(("s", "x", "ch", "sh")):
        w = w + "es"
    else:
        w = w + "s"
    return f"{head} {w}" if head else w


def _typo(text: str, rng: np.random.Generator) -> str:
    """One keyboard slip (swap, drop, double or neighbour key) in a word of 4+ letters."""
    words = text.split(" ")
    cands = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not cands:
        return text
    wi = cands[int(rng.integers(len(cands)))]
    w = words[wi]
    for _ in range(10):
        op = int(rng.integers(4))
        i = int(rng.integers(1, len(w) - 1))  # keep the first letter, as people mostly do
        if op == 0:
            new = w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        elif op == 1:
            new = w[:i] + w[i + 1 :]
        elif op == 2:
            new = w[:i] + w[i] + w[i:]
        else:
            nb = _NEIGHBOURS.get(w[i], "")
            new = w[:i] + (nb[int(rng.integers(len(nb)))] if nb else w[i]) + w[i + 1 :]
        if new != w:
            words[wi] = new
            return " ".join(words)
    return text


class PartitionWriter(Protocol):
    def write_partition(self, df: pd.DataFrame, zone: str, dataset: str, day: Any) -> list[str]: ...


# ---------------------------------------------------------------------------------------
# Marketplace
# ---------------------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """Hidden state: what products and queries *really* are.  Rows align with the frames."""

    noise_key: int
    leaf: np.ndarray  # (n_products,) leaf index into LEAVES
    brand: np.ndarray  # (n_products,) index into BRANDS
    attrs: np.ndarray  # (n_products, MAX_SLOTS) value index per leaf attribute slot, -1 = none
    price_pct: np.ndarray  # (n_products,) price percentile within the leaf
    created_us: np.ndarray  # (n_products,) listing time, µs since epoch (UTC)
    q_leaf: np.ndarray  # (n_queries,)
    q_brand: np.ndarray  # (n_queries,) -1 = no brand constraint
    q_attrs: np.ndarray  # (n_queries, MAX_SLOTS) -1 = not constrained
    q_price: np.ndarray  # (n_queries,) PRICE_NONE / PRICE_CHEAP / PRICE_PREMIUM
    q_synonym: np.ndarray  # (n_queries,) bool: uses a query-only synonym or another inflection
    q_typo: np.ndarray  # (n_queries,) bool: contains a typo
    judged: list[np.ndarray]  # per query: product row indices that carry a human judgment
    user_brands: list[np.ndarray]  # per user: preferred brand indices
    user_price_sensitivity: np.ndarray  # (n_users,) in [0, 1]
    user_top: np.ndarray  # (n_users,) preferred department
    user_activity: np.ndarray  # (n_users,) relative number of sessions
    # realistic profile only (None in the default profile)
    profile: str = "default"
    model: np.ndarray | None = None  # (n_products,) model-line id; variants of a line share its code
    model_codes: np.ndarray | None = None  # (n_models,) the code printed in titles ("KX4521")
    fits: np.ndarray | None = None  # (n_products,) product row an accessory names, -1 = none
    q_model: np.ndarray | None = None  # (n_queries,) model-line id the query asks for, -1 = none
    # (n_products,) the brand a query's brand constraint is checked against: for an accessory
    # the brand of the product it fits ("aurex ear pads" = ear pads for Aurex headphones)
    match_brand: np.ndarray | None = None

    def query_traits(self, queries: pd.DataFrame) -> pd.DataFrame:
        """Per-query intent, for debugging and slice analysis (not for training)."""
        traits = pd.DataFrame({
            "query": queries["query"].to_numpy(),
            "category": [LEAVES[i].path for i in self.q_leaf],
            "brand": [BRANDS[b] if b >= 0 else None for b in self.q_brand],
            "n_attribute_constraints": (self.q_attrs >= 0).sum(axis=1),
            "price_intent": np.array(["none", "cheap", "premium"])[self.q_price],
            "has_synonym": self.q_synonym,
            "has_typo": self.q_typo,
        })
        if self.q_model is not None and self.model_codes is not None:
            traits["model_code"] = [self.model_codes[m] if m >= 0 else None for m in self.q_model]
            traits["accessory_query"] = LEAF_FITS[self.q_leaf] >= 0
        return traits


@dataclass
class Marketplace:
    """Frames in the data contracts plus the hidden ground truth.

    ``catalog`` holds every product, including those listed after ``start``; use
    :meth:`catalog_for_day` for what the shop shows on a given day.
    """

    seed: int
    start: dt.date
    catalog: pd.DataFrame = field(repr=False)
    queries: pd.DataFrame = field(repr=False)
    judgments: pd.DataFrame = field(repr=False)
    users: pd.DataFrame = field(repr=False)
    truth: GroundTruth = field(repr=False)

    def __post_init__(self) -> None:
        self._pid_index = pd.Index(self.catalog["product_id"].to_numpy(dtype=object))
        self._qindex = {q: i for i, q in enumerate(self.queries["query"].to_numpy(dtype=object))}
        self._created_order = np.argsort(self.truth.created_us, kind="stable")
        self._created_sorted = self.truth.created_us[self._created_order]
        self._leaf_by_created: list[np.ndarray] = []
        leaf_sorted = self.truth.leaf[self._created_order]
        for li in range(len(LEAVES)):
            self._leaf_by_created.append(self._created_order[leaf_sorted == li])

    def __repr__(self) -> str:
        return (f"Marketplace(seed={self.seed}, start={self.start}, products={len(self.catalog)}, "
                f"queries={len(self.queries)}, judgments={len(self.judgments)}, users={len(self.users)})")

    # ---- days and cold start ----------------------------------------------------------
    def day_end_us(self, day: dt.date | str) -> int:
        return day_start_us(_as_date(day) + dt.timedelta(days=1))

    def available_index(self, day: dt.date | str) -> np.ndarray:
        """Row indices (ordered by listing time) of the products listed by the end of ``day``."""
        n = int(np.searchsorted(self._created_sorted, self.day_end_us(day), side="left"))
        return self._created_order[:n]

    def leaf_available_index(self, leaf: int, day: dt.date | str) -> np.ndarray:
        """Row indices of the leaf's products listed by the end of ``day``, oldest first."""
        pool = self._leaf_by_created[leaf]
        n = int(np.searchsorted(self.truth.created_us[pool], self.day_end_us(day), side="left"))
        return pool[:n]

    def catalog_for_day(self, day: dt.date | str) -> pd.DataFrame:
        """Products with ``created_at`` <= the end of ``day`` (UTC), in product_id order."""
        mask = self.truth.created_us < self.day_end_us(day)
        return self.catalog[mask].reset_index(drop=True)

    def judgments_for_day(self, day: dt.date | str) -> pd.DataFrame:
        """Judgments whose product is listed by the end of ``day``."""
        listed = self.truth.created_us < self.day_end_us(day)
        keep = listed[self._pid_index.get_indexer(self.judgments["product_id"].to_numpy(dtype=object))]
        return self.judgments[keep].reset_index(drop=True)

    # ---- hidden relevance -------------------------------------------------------------
    def query_index(self, query_row: str | Mapping[str, Any] | pd.Series) -> int:
        q = query_row if isinstance(query_row, str) else query_row["query"]
        try:
            return self._qindex[str(q)]
        except KeyError:
            raise KeyError(f"query {q!r} is not one of this marketplace's queries") from None

    def product_index(self, products: pd.DataFrame | Sequence[str] | np.ndarray) -> np.ndarray:
        ids = products["product_id"] if isinstance(products, pd.DataFrame) else products
        idx = self._pid_index.get_indexer(np.asarray(ids, dtype=object))
        if (idx < 0).any():
            missing = np.asarray(ids, dtype=object)[idx < 0][:5]
            raise KeyError(f"unknown product ids, e.g. {list(missing)}")
        return idx

    def relevance_by_index(self, qi: int, pidx: np.ndarray) -> np.ndarray:
        """Hidden relevance of product rows ``pidx`` for query row ``qi`` (see module docs)."""
        t = self.truth
        pidx = np.asarray(pidx, dtype=np.int64)
        pl = t.leaf[pidx]
        ql = int(t.q_leaf[qi])
        same_leaf = pl == ql
        outside = np.where(LEAF_MID[pl] == LEAF_MID[ql], SIBLING_RELEVANCE,
                           np.where(LEAF_TOP[pl] == LEAF_TOP[ql], SAME_TOP_RELEVANCE, 0.0))
        acc = LEAF_ACCESSORY[pl]
        if LEAF_ACCESSORY[ql] or acc.any():
            # an accessory and a product it fits (or any neighbour) answer each other's queries badly
            outside = np.where((acc | LEAF_ACCESSORY[ql]) & (LEAF_MID[pl] == LEAF_MID[ql]), ACCESSORY_RELEVANCE,
                               outside)
        cons = t.q_attrs[qi]
        slots = np.nonzero(cons >= 0)[0]
        q_model = int(t.q_model[qi]) if t.q_model is not None else -1
        n_cons = len(slots) + int(t.q_brand[qi] >= 0) + int(t.q_price[qi] != PRICE_NONE) + int(q_model >= 0)
        if n_cons:
            sat = (t.attrs[pidx][:, slots] == cons[slots]).sum(axis=1).astype(np.float64)
            if q_model >= 0 and t.model is not None:
                sat += t.model[pidx] == q_model
            if t.q_brand[qi] >= 0:
                sat += (t.brand if t.match_brand is None else t.match_brand)[pidx] == t.q_brand[qi]
            if t.q_price[qi] == PRICE_CHEAP:
                sat += t.price_pct[pidx] <= CHEAP_PCT
            elif t.q_price[qi] == PRICE_PREMIUM:
                sat += t.price_pct[pidx] >= PREMIUM_PCT
            frac = sat / n_cons
        else:
            frac = np.ones(len(pidx))
        rel = np.where(same_leaf, LEAF_BASE + (1.0 - LEAF_BASE) * frac, outside)
        rel = rel + NOISE_SD * pair_noise(t.noise_key, qi, pidx)
        return np.clip(rel, 0.0, 1.0)

    def true_relevance(self, query_row: str | Mapping[str, Any] | pd.Series,
                       products: pd.DataFrame | Sequence[str] | np.ndarray) -> np.ndarray:
        """Hidden relevance in [0, 1] of ``products`` (frame with product_id, or ids) for a query."""
        return self.relevance_by_index(self.query_index(query_row), self.product_index(products))

    # ---- storage ----------------------------------------------------------------------
    def write_to_storage(self, storage: PartitionWriter, day: dt.date | str | None = None) -> dict[str, list[str]]:
        """Write raw/catalog, raw/judgments and raw/queries partitions for ``day`` (default ``start``).

        The catalogue partition is the catalogue of that day (cold start respected) and the
        judgments are limited to products in it, so every judged product exists.
        """
        day = _as_date(day) if day is not None else self.start
        frames = {
            "catalog": CATALOG.conform(self.catalog_for_day(day)),
            "judgments": JUDGMENTS.conform(self.judgments_for_day(day)),
            "queries": QUERIES.conform(self.queries),
        }
        written = {}
        for dataset, df in frames.items():
            written[dataset] = storage.write_partition(df, "raw", dataset, day)
            log.info("wrote raw/%s/dt=%s: %d rows", dataset, day.isoformat(), len(df))
        return written

    def summary(self) -> dict[str, Any]:
        grades = self.judgments["grade"].value_counts().sort_index()
        return {
            "seed": self.seed, "start": self.start.isoformat(), "products": len(self.catalog),
            "products_on_start": int((self.truth.created_us < self.day_end_us(self.start)).sum()),
            "queries": len(self.queries), "judgments": len(self.judgments), "users": len(self.users),
            "grades": {int(k): int(v) for k, v in grades.items()},
            "leaves": int(len(np.unique(self.truth.leaf))),
        }


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------
def _products(n: int, rng: np.random.Generator, n_leaves: int = N_CORE_LEAVES) -> dict[str, np.ndarray]:
    """Structured products over the first ``n_leaves`` leaves (core leaves, or all with accessories)."""
    w = np.array([leaf.weight for leaf in LEAVES[:n_leaves]]) * rng.lognormal(0.0, 0.3, n_leaves)
    leaf = rng.choice(n_leaves, size=n, p=w / w.sum()).astype(np.int16)

    brand = np.empty(n, dtype=np.int32)
    attrs = np.full((n, MAX_SLOTS), -1, dtype=np.int16)
    price = np.empty(n, dtype=np.float64)
    brand_premium = rng.lognormal(0.0, 0.25, len(BRANDS))
    for li, lf in enumerate(LEAVES):
        ix = np.nonzero(leaf == li)[0]
        if not len(ix):
            continue
        cand = np.nonzero(BRAND_MID == LEAF_MID[li])[0]
        bw = 1.0 / np.arange(1, len(cand) + 1) ** 0.8
        bw = rng.permutation(bw)
        brand[ix] = cand[rng.choice(len(cand), size=len(ix), p=bw / bw.sum())]
        for j, a in enumerate(lf.attrs):
            vw = rng.dirichlet(np.full(len(a.values), 2.0))
            attrs[ix, j] = rng.choice(len(a.values), size=len(ix), p=vw)
        raw = np.exp(np.log(lf.price_median) + lf.price_sigma * rng.standard_normal(len(ix))) * brand_premium[brand[ix]]
        price[ix] = np.where(raw >= 5, np.floor(raw) + 0.99, np.round(np.maximum(raw, 0.5), 2))
    price_pct = pd.Series(price).groupby(leaf).rank(pct=True).to_numpy()
    return {"leaf": leaf, "brand": brand, "attrs": attrs, "price": price, "price_pct": price_pct}


def _created(n: int, start: dt.date, new_fraction: float, new_days: int, rng: np.random.Generator) -> np.ndarray:
    s = day_start_us(start)
    created = s - rng.integers(1, 730 * DAY_US, size=n)
    is_new = rng.random(n) < new_fraction if new_days > 0 else np.zeros(n, dtype=bool)
    k = int(is_new.sum())
    created[is_new] = s + rng.integers(1, new_days + 1, size=k) * DAY_US + rng.integers(0, DAY_US, size=k)
    return created


def _text(p: dict[str, np.ndarray], rng: np.random.Generator, models: np.ndarray | None = None,
          titles: Sequence[str] = TITLES) -> dict[str, np.ndarray]:
    """Titles, descriptions and attribute JSON, rendered per leaf with vectorised templates.

    ``models``: each product's model code (default: a random one drawn here); ``titles``: the
    title templates.  Also returns the model code and the attribute words shown before
    (``pre``) and after (``post``) the noun in the title, for accessory titles.
    """
    n = len(p["leaf"])
    title = np.empty(n, dtype=object)
    desc = np.empty(n, dtype=object)
    attrs_json = np.empty(n, dtype=object)
    model_out = np.empty(n, dtype=object)
    pre_out = np.empty(n, dtype=object)
    post_out = np.empty(n, dtype=object)
    brands = _obj(BRANDS)
    adj_cap = _obj(ADJECTIVES)
    adj_low = _obj([a.lower() for a in ADJECTIVES])
    a_adj = _obj([("an " if a[0] in "AEIOU" else "a ") + a.lower() for a in ADJECTIVES])
    prefixes = _obj(MODEL_PREFIXES)
    numbers = _obj([str(i) for i in range(1, 1000)])
    tier = np.where(p["price_pct"] <= CHEAP_PCT, PRICE_CHEAP, np.where(p["price_pct"] >= PREMIUM_PCT, PRICE_PREMIUM, 0))
    price_phr = {k: _obj([" " + s for s in v]) for k, v in PRICE_PHRASES.items()}
    closings = _obj([" " + s for s in CLOSINGS])
    for li, lf in enumerate(LEAVES):
        ix = np.nonzero(p["leaf"] == li)[0]
        m = len(ix)
        if not m:
            continue
        brand = brands[p["brand"][ix]]
        if models is None:
            model = prefixes[rng.integers(len(prefixes), size=m)] + numbers[rng.integers(len(numbers), size=m)]
        else:
            model = models[ix]
        adj_i = rng.integers(len(ADJECTIVES), size=m)
        pre = np.full(m, "", dtype=object)
        post = np.full(m, "", dtype=object)
        body = np.full(m, "", dtype=object)
        json_out: Any = "{"
        stuffing: list[np.ndarray] = []
        for j, a in enumerate(lf.attrs):
            code = p["attrs"][ix, j].astype(np.int64)
            texts = [a.fmt.format(v=v) for v in a.values]
            shown = rng.random(m) < 0.8  # titles mention most attributes, not all
            if a.pre:
                pre = pre + np.where(shown, _obj([_cap_words(t) + " " for t in texts])[code], "")
            else:
                post = post + np.where(shown, _obj([", " + _cap_words(t) for t in texts])[code], "")
            sent = np.array([[" " + s.format(t=t, T=_cap_first(t)) for t in texts] for s in a.sentences], dtype=object)
            said = rng.random(m) < 0.9
            body = body + np.where(said, sent[rng.integers(len(a.sentences), size=m), code], "")
            if len(a.values) > 1:
                # listings name other variants too: lexical bait for BM25, learnable for a model
                other = (code + rng.integers(1, len(a.values), size=m)) % len(a.values)
                bait = _obj([s.format(t=t) for t in texts for s in VARIANT_MENTIONS]).reshape(len(texts), -1)
                bait = bait[other, rng.integers(len(VARIANT_MENTIONS), size=m)]
                body = body + np.where(rng.random(m) < (0.35 if a.key == "colour" else 0.15), bait, "")
                stuffing.append(_obj(texts)[other])
            sep = "" if j == 0 else ", "
            json_out = json_out + f'{sep}{json.dumps(a.key)}: "' + _obj(list(a.values))[code] + '"'
        attrs_json[ix] = json_out + "}"
        model_out[ix], pre_out[ix], post_out[ix] = model, pre, post

        fields = {"brand": brand, "model": model, "pre": pre, "post": post}
        t_i = rng.integers(len(titles), size=m)
        out = np.empty(m, dtype=object)
        for t, template in enumerate(titles):
            sel = t_i == t
            f = {k: v[sel] for k, v in fields.items()}
            f.update(adj=adj_cap[adj_i[sel]], noun=_cap_words(lf.noun))
            out[sel] = _render(template, f, int(sel.sum()))
        title[ix] = out

        i_i = rng.integers(len(INTROS), size=m)
        intro = np.empty(m, dtype=object)
        for t, template in enumerate(INTROS):
            sel = i_i == t
            f = {"brand": brand[sel], "model": model[sel], "adj": adj_low[adj_i[sel]],
                 "a_adj": a_adj[adj_i[sel]], "noun": lf.noun}
            intro[sel] = _render(template, f, int(sel.sum()))
        fillers = _obj([" " + s for s in FILLERS[lf.top]])
        text = intro + body
        siblings = [k for k in range(N_CORE_LEAVES) if LEAF_MID[k] == LEAF_MID[li] and k != li]
        if siblings:
            # complements mention their neighbours ("Pairs well with any smartphone.")
            mention = _obj([t.format(noun=LEAVES[k].noun) for k in siblings for t in COMPLEMENT_MENTIONS])
            text = text + np.where(rng.random(m) < 0.35, mention[rng.integers(len(mention), size=m)], "")
        text = text + np.where(rng.random(m) < 0.6, fillers[rng.integers(len(fillers), size=m)], "")
        tr = tier[ix]
        for k, phr in price_phr.items():
            sel = (tr == k) & (rng.random(m) < 0.85)
            text[sel] = text[sel] + phr[rng.integers(len(phr), size=int(sel.sum()))]
        text = text + np.where(rng.random(m) < 0.5, closings[rng.integers(len(closings), size=m)], "")
        # keyword stuffing by some sellers: own noun, a neighbour's noun, other variants
        stuffed = rng.random(m) < 0.08
        if stuffed.any() and siblings:
            k = int(stuffed.sum())
            sib_nouns = _obj([LEAVES[i].noun for i in siblings])[rng.integers(len(siblings), size=k)]
            tags = " Keywords: " + sib_nouns + ", " + lf.noun
            for alt in stuffing[:3]:
                tags = tags + ", " + alt[stuffed]
            text[stuffed] = text[stuffed] + tags + "."
        text[rng.random(m) < 0.01] = None  # a few listings have no description
        desc[ix] = text
    return {"title": title, "description": desc, "attributes": attrs_json, "model": model_out, "pre": pre_out,
            "post": post_out}


def _users(n_users: int, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, Any]]:
    top = rng.integers(len(TOPS), size=n_users)
    sens = rng.beta(2.0, 2.0, size=n_users)
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    brand_top = LEAF_TOP[[next(i for i, lf in enumerate(LEAVES) if MIDS.index(lf.mid) == m) for m in BRAND_MID]]
    prefs = []
    for u in range(n_users):
        cand = np.nonzero(brand_top == top[u])[0]
        prefs.append(np.sort(rng.choice(cand, size=int(rng.integers(1, 4)), replace=False)))
    width = max(6, len(str(n_users)))
    users = pd.DataFrame({
        "user_id": [f"U{i:0{width}d}" for i in range(n_users)],
        "preferred_brands": [json.dumps([BRANDS[b] for b in pr]) for pr in prefs],
        "preferred_category": [TOPS[t] for t in top],
        "price_sensitivity": sens,
        "activity": activity,
    }).astype({"user_id": "string", "preferred_brands": "string", "preferred_category": "string"})
    return users, {"user_brands": prefs, "user_price_sensitivity": sens, "user_top": top.astype(np.int16),
                   "user_activity": activity}


def _queries(n_queries: int, p: dict[str, np.ndarray], pool: np.ndarray, rng: np.random.Generator,
             synonym_rate: float, typo_rate: float,
             inflection_rate: float, *, model: np.ndarray | None = None, model_codes: np.ndarray | None = None,
             model_query_rate: float = 0.0, brand_query_rate: float = 0.0,
             accessory_query_keep: float = 1.0,
             match_brand: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Distinct queries, each derived from a random product of ``pool``.

    With ``model`` (realistic profile): ``model_query_rate`` of the queries name a product's
    model code ("kx4521", "aurex kx4521", "aurex kx-4521 headphones"), ``brand_query_rate`` is
    an extra chance that an attribute query names the brand, and a query drawn from an
    accessory is kept with probability ``accessory_query_keep`` and names the brand of the
    product it fits (``match_brand``).  Without ``model``, the draws are exactly those of the
    default profile.
    """
    brand_of = p["brand"] if match_brand is None else match_brand
    realistic = model is not None and model_codes is not None
    texts: list[str] = []
    seen: set[str] = set()
    q_leaf, q_brand, q_price, q_syn, q_typo, q_attrs, n_terms, q_model = [], [], [], [], [], [], [], []
    tier = np.where(p["price_pct"] <= CHEAP_PCT, PRICE_CHEAP, np.where(p["price_pct"] >= PREMIUM_PCT, PRICE_PREMIUM, 0))
    attempts = 0
    while len(texts) < n_queries and attempts < 50 * n_queries and len(pool):
        attempts += 1
        prod = int(pool[rng.integers(len(pool))])
        li = int(p["leaf"][prod])
        lf = LEAVES[li]
        if realistic and LEAF_FITS[li] >= 0 and rng.random() >= accessory_query_keep:
            continue  # shoppers look for products more often than for their accessories
        cons = np.full(MAX_SLOTS, -1, dtype=np.int16)
        brand, price, syn, mdl = -1, PRICE_NONE, False, -1
        if realistic and LEAF_FITS[li] < 0 and rng.random() < model_query_rate:
            assert model is not None and model_codes is not None
            mdl = int(model[prod])
            code = str(model_codes[mdl]).lower()
            r = rng.random()  # typed as printed, or split at the letters: "kx 4521", "kx-4521"
            typed = code if r >= 0.25 else code[:2] + (" " if r < 0.15 else "-") + code[2:]
            r = rng.random()
            brand = int(p["brand"][prod]) if r >= 0.3 else -1
            words = ([BRANDS[brand].lower()] if brand >= 0 else []) + [typed] + ([lf.noun] if r >= 0.7 else [])
            text = " ".join(words)
            n_chosen = 2
        else:
            kinds: list[tuple[str, int]] = [("attr", j) for j in range(len(lf.attrs))] + [("brand", 0)]
            if tier[prod] != PRICE_NONE:
                kinds.append(("price", int(tier[prod])))
            k = min(int(rng.choice(4, p=[0.22, 0.42, 0.26, 0.10])), len(kinds))
            chosen = [kinds[i] for i in sorted(rng.choice(len(kinds), size=k, replace=False))]
            if brand_query_rate and ("brand", 0) not in chosen and rng.random() < brand_query_rate:
                chosen.append(("brand", 0))
            head: list[str] = []
            pre: list[str] = []
            post: list[str] = []
            for kind, j in chosen:
                if kind == "attr":
                    a = lf.attrs[j]
                    code_i = int(p["attrs"][prod, j])
                    cons[j] = code_i
                    word = a.fmt.format(v=a.values[code_i]).lower()
                    alts = VALUE_SYNONYMS.get(word, ())
                    if alts and rng.random() < synonym_rate:
                        word, syn = alts[int(rng.integers(len(alts)))], True
                    (pre if a.pre else post).append(word)
                elif kind == "brand":
                    brand = int(brand_of[prod])
                    word = BRANDS[brand].lower()
                    (post if rng.random() < 0.15 else head).append(word)
                else:
                    price = j
                    words = PRICE_QUERY_WORDS[j]
                    head.insert(0, words[int(rng.integers(len(words)))])
            noun = lf.noun
            if lf.synonyms and rng.random() < synonym_rate:
                noun, syn = lf.synonyms[int(rng.integers(len(lf.synonyms)))], True
            elif rng.random() < inflection_rate:
                noun, syn = _inflect(noun), True
            text = " ".join(head + pre + [noun] + post)
            n_chosen = len(chosen)
        typo = False
        if rng.random() < typo_rate:
            new = _typo(text, rng)
            typo = new != text
            text = new
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        q_leaf.append(li)
        q_brand.append(brand)
        q_price.append(price)
        q_syn.append(syn)
        q_typo.append(typo)
        q_attrs.append(cons)
        n_terms.append(n_chosen)
        q_model.append(mdl)
    if len(texts) < n_queries:
        log.warning("generated %d distinct queries, fewer than the %d asked for", len(texts), n_queries)
    nq = len(texts)
    # Zipf-like frequencies over a rank that favours short, clean queries (head) and pushes
    # long, misspelt ones to the tail.
    key = np.array(n_terms, dtype=float) + 1.5 * np.array(q_typo, dtype=float) + rng.normal(0.0, 0.7, nq)
    rank = np.empty(nq, dtype=np.int64)
    rank[np.argsort(key, kind="stable")] = np.arange(1, nq + 1)
    freq = np.maximum(1, np.round(3000.0 * rank.astype(float) ** -1.1)).astype(np.int64)
    queries = pd.DataFrame({"query": texts, "frequency": freq, "category": [LEAVES[i].path for i in q_leaf]})
    truth = {
        "q_leaf": np.array(q_leaf, dtype=np.int16), "q_brand": np.array(q_brand, dtype=np.int32),
        "q_attrs": np.array(q_attrs, dtype=np.int16).reshape(nq, MAX_SLOTS),
        "q_price": np.array(q_price, dtype=np.int8), "q_synonym": np.array(q_syn, dtype=bool),
        "q_typo": np.array(q_typo, dtype=bool),
    }
    if realistic:
        truth["q_model"] = np.array(q_model, dtype=np.int32)
    return QUERIES.conform(queries), truth


def _judge(mp_rel, q_leaf: np.ndarray, leaf: np.ndarray, pool: np.ndarray,
           rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pick ~20-40 products per query: positives, hard negatives, random negatives."""
    pool_leaf = leaf[pool]
    by_leaf = [pool[pool_leaf == li] for li in range(len(LEAVES))]
    by_mid = [pool[LEAF_MID[pool_leaf] == m] for m in range(len(MIDS))]
    judged, grades = [], []
    for qi, ql in enumerate(q_leaf):
        total = int(rng.integers(20, 41))
        n_pos = int(rng.integers(3, 9))
        rest = total - n_pos
        n_hard, n_sib = int(round(0.4 * rest)), int(round(0.2 * rest))
        n_rand = rest - n_hard - n_sib
        same = by_leaf[ql]
        rel = mp_rel(qi, same)
        k = min(n_pos, len(same))
        pos = same[np.argpartition(-rel, k - 1)[:k]] if k else same[:0]
        keep = np.ones(len(same), dtype=bool)
        keep[np.isin(same, pos)] = False
        others, o_rel = same[keep], rel[keep]
        if len(others):
            # near misses (right type, some constraints met) are likelier than plain substitutes
            w = 0.1 + o_rel**4
            hard = rng.choice(others, size=min(n_hard, len(others)), replace=False, p=w / w.sum())
        else:
            hard = others
        mid = by_mid[LEAF_MID[ql]]
        sib = mid[leaf[mid] != ql]
        sib = rng.choice(sib, size=min(n_sib, len(sib)), replace=False) if len(sib) else sib
        rnd = pool[rng.integers(len(pool), size=2 * n_rand + 2)]
        picked = pd.unique(np.concatenate([pos, hard, sib, rnd]))
        picked = picked[: len(pos) + len(hard) + len(sib) + n_rand]
        picked = rng.permutation(picked)
        judged.append(picked.astype(np.int64))
        grades.append(relevance_to_grade(mp_rel(qi, picked)))
    return judged, grades


# ---------------------------------------------------------------------------------------
# Realistic profile
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Knobs of a generation profile (see the module docstring, "Profiles")."""

    name: str
    synonym_rate: float
    typo_rate: float
    inflection_rate: float
    accessories: bool = False  # list accessory products that name the product they fit
    model_query_rate: float = 0.0  # share of queries that name a model code
    brand_query_rate: float = 0.0  # extra chance that an attribute query names the brand
    accessory_query_keep: float = 1.0  # a query drawn from an accessory is kept with this probability
    judgments_per_query: tuple[int, int] = (20, 40)
    lexical_share: float = 0.0  # share of judged products drawn from the lexical engine's top results
    cross_stuffing_rate: float = 0.0  # listings that append other departments' nouns ("Popular searches: ...")


PROFILES: dict[str, Profile] = {
    "default": Profile("default", synonym_rate=0.3, typo_rate=0.12, inflection_rate=0.15),
    "realistic": Profile("realistic", synonym_rate=0.12, typo_rate=0.08, inflection_rate=0.1, accessories=True,
                         model_query_rate=0.12, brand_query_rate=0.2, accessory_query_keep=0.5,
                         judgments_per_query=(8, 20), lexical_share=0.6, cross_stuffing_rate=0.06),
}

REALISTIC_TITLES = (
    "{brand} {model} {pre}{noun}{post}",
    "{brand} {adj} {pre}{noun} {model}{post}",
    "{brand} {pre}{noun} {model}{post}",
    "{adj} {pre}{noun} by {brand}, Model {model}{post}",
)
ACCESSORY_TITLES = (
    "{brand} {pre}{noun} for {tbrand} {tmodel} {tnoun}{post}",
    "{pre}{noun} Compatible with {tbrand} {tmodel} {tpre}{tnoun}{post}",
    "Replacement {noun} for {tbrand} {tpre}{tnoun} {tmodel} by {brand}{post}",
    "{tbrand} {tnoun} {noun} for {tmodel}, {brand} {pre}{noun}{post}",
    "{brand} {noun} for {tnoun}: Fits {tbrand} {tmodel} {tpre}{tnoun}{post}",
)
ACCESSORY_SENTENCES = (" Compatible with the {tbrand} {tmodel} and other {tbrand} {tnoun}.",
                       " Designed to fit {tbrand} {tnoun} ({tmodel}).")
# The realistic profile's "search engine" that produced the judged results (see _judge_realistic).
ENGINE_TOP = 30
ENGINE_SEMANTIC_NOISE = 0.12


def _model_lines(p: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Model lines: products of one (leaf, brand) share a code in groups of ~1.7 variants.

    Returns each product's model-line id and each line's code (two letters, 3-4 digits, an
    optional suffix letter: "KX4521", "QB730N"), unique within the marketplace.
    """
    leaf, brand = p["leaf"].astype(np.int64), p["brand"].astype(np.int64)
    n = len(leaf)
    _, inv, counts = np.unique(leaf * len(BRANDS) + brand, return_inverse=True, return_counts=True)
    n_lines = np.maximum(1, np.ceil(counts / 1.7)).astype(np.int64)
    line = np.minimum((rng.random(n) * n_lines[inv]).astype(np.int64), n_lines[inv] - 1)
    _, model = np.unique(inv.astype(np.int64) * (n + 1) + line, return_inverse=True)
    n_models = int(model.max()) + 1 if n else 0
    letters = np.array(list("ABCDEFGHJKLMNPQRSTUVWXZ"), dtype=object)
    suffixes = np.array(["", "", "", "", "", "N", "S", "X", "L"], dtype=object)
    codes = np.empty(n_models, dtype=object)
    todo = np.arange(n_models)
    taken: set[str] = set()
    while len(todo):
        k = len(todo)
        drawn = (letters[rng.integers(len(letters), size=k)] + letters[rng.integers(len(letters), size=k)]
                 + rng.integers(100, 10_000, size=k).astype(str).astype(object)
                 + suffixes[rng.integers(len(suffixes), size=k)])
        retry = []
        for i, c in zip(todo.tolist(), drawn.tolist()):
            if c in taken:
                retry.append(i)
            else:
                taken.add(c)
                codes[i] = c
        todo = np.array(retry, dtype=np.int64)
    return model.astype(np.int32), codes


def _accessory_text(p: dict[str, np.ndarray], txt: dict[str, np.ndarray],
                    rng: np.random.Generator) -> np.ndarray:
    """Titles (and a sentence of the description) of accessories that name the product they fit.

    Rewrites ``txt["title"]`` / ``txt["description"]`` in place for products of leaves with
    ``fits``; returns, per product, the row of the product it names (-1 for non-accessories).
    """
    leaf = p["leaf"]
    fits = np.full(len(leaf), -1, dtype=np.int64)
    brands = _obj(BRANDS)
    for li in np.unique(leaf).tolist():
        target_leaf = int(LEAF_FITS[li])
        if target_leaf < 0:
            continue
        ix = np.nonzero(leaf == li)[0]
        m = len(ix)
        targets = np.nonzero(leaf == target_leaf)[0]
        lf, tl = LEAVES[li], LEAVES[target_leaf]
        fields: dict[str, Any] = {"brand": brands[p["brand"][ix]], "pre": txt["pre"][ix], "post": txt["post"][ix],
                                  "noun": _cap_words(lf.noun), "tnoun": _cap_words(tl.noun)}
        if not len(targets):  # a tiny catalogue without the product: a generic accessory
            txt["title"][ix] = _render("{brand} {pre}{noun} for {tnoun}{post}", fields, m)
            continue
        t = targets[rng.integers(len(targets), size=m)]
        fits[ix] = t
        fields.update(tbrand=brands[p["brand"][t]], tmodel=txt["model"][t], tpre=txt["pre"][t])
        t_i = rng.integers(len(ACCESSORY_TITLES), size=m)
        out = np.empty(m, dtype=object)
        for k, template in enumerate(ACCESSORY_TITLES):
            sel = t_i == k
            out[sel] = _render(template, {f: (v[sel] if isinstance(v, np.ndarray) else v) for f, v in fields.items()},
                               int(sel.sum()))
        txt["title"][ix] = out
        s_i = rng.integers(len(ACCESSORY_SENTENCES), size=m)
        said = (rng.random(m) < 0.6) & np.array([d is not None for d in txt["description"][ix]], dtype=bool)
        for k, template in enumerate(ACCESSORY_SENTENCES):
            sel = said & (s_i == k)
            if sel.any():
                f = {f: (v[sel] if isinstance(v, np.ndarray) else v) for f, v in fields.items()}
                txt["description"][ix[sel]] = txt["description"][ix[sel]] + _render(template, f, int(sel.sum()))
    return fits


def _cross_stuffing(p: dict[str, np.ndarray], txt: dict[str, np.ndarray], rng: np.random.Generator,
                    rate: float) -> None:
    """Keyword spam across departments: ``rate`` of the listings end their description with
    "Popular searches: sunglasses, board game, yoga mat." (nouns of other departments' leaves)."""
    leaf = p["leaf"]
    n = len(leaf)
    spam = (rng.random(n) < rate) & np.array([d is not None for d in txt["description"]], dtype=bool)
    ix = np.nonzero(spam)[0]
    if not len(ix):
        return
    nouns = _obj([lf.noun for lf in LEAVES[:N_CORE_LEAVES]])
    picks = rng.integers(N_CORE_LEAVES, size=(len(ix), 3))
    foreign = LEAF_TOP[picks] != LEAF_TOP[leaf[ix]][:, None]
    words = [", ".join(dict.fromkeys(nouns[row[ok]].tolist())) for row, ok in zip(picks, foreign)]
    tags = _obj([f" Popular searches: {w}." if w else "" for w in words])
    txt["description"][ix] = txt["description"][ix] + tags


class _LexicalEngine:
    """Okapi BM25 (k1 1.2, b 0.75, Lucene IDF) over a product pool: the shop's lexical engine.

    Indexes title (twice: a title field boost), brand, category leaf and description; tokens
    are lower-case ``\w+`` runs, no stemming.  Used only to pick which products get judged.
    """

    _TOKEN = re.compile(r"\w+")

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        vocab: dict[str, int] = {}
        term_ids: list[int] = []
        doc_ids: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.float64)
        for d, text in enumerate(texts):
            toks = self._TOKEN.findall(text.lower().replace("_", " "))
            lengths[d] = len(toks)
            for tok in toks:
                term_ids.append(vocab.setdefault(tok, len(vocab)))
            doc_ids.extend([d] * len(toks))
        n_docs = max(1, len(texts))
        keys, tf = np.unique(np.asarray(term_ids, dtype=np.int64) * n_docs + np.asarray(doc_ids, dtype=np.int64),
                             return_counts=True)
        term, self.doc = keys // n_docs, keys % n_docs
        self.indptr = np.searchsorted(term, np.arange(len(vocab) + 1))
        df = np.diff(self.indptr).astype(np.float64)
        idf = np.log(1.0 + (len(texts) - df + 0.5) / (df + 0.5))
        avgdl = lengths.mean() if len(texts) else 1.0
        norm = k1 * (1.0 - b + b * lengths[self.doc] / max(avgdl, 1e-9))
        self.weight = idf[term] * tf * (k1 + 1.0) / (tf + norm)
        self.vocab, self.n_docs = vocab, len(texts)

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n_docs, dtype=np.float64)
        for tok in self._TOKEN.findall(query.lower().replace("_", " ")):
            t = self.vocab.get(tok)
            if t is not None:
                sl = slice(self.indptr[t], self.indptr[t + 1])
                out += np.bincount(self.doc[sl], weights=self.weight[sl], minlength=self.n_docs)
        return out

    def top(self, query: str, k: int) -> np.ndarray:
        """Positions of the ``k`` best-scoring documents with a score > 0, best first."""
        sc = self.scores(query)
        hits = np.nonzero(sc > 0)[0]
        return hits[np.lexsort((hits, -sc[hits]))][:k]


def _sample_ranked(items: np.ndarray, k: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    """``k`` of ``items`` (a ranked list) without replacement, favouring the top ranks."""
    items = items[~np.isin(items, exclude)]
    k = min(k, len(items))
    if k <= 0:
        return items[:0]
    w = 1.0 / np.arange(1, len(items) + 1) ** 0.8
    return rng.choice(items, size=k, replace=False, p=w / w.sum())


def _judge_realistic(mp_rel, q_text: np.ndarray, q_leaf: np.ndarray, leaf: np.ndarray, pool: np.ndarray,
                     engine: _LexicalEngine, rng: np.random.Generator,
                     prof: Profile) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A human-graded sample of the top results of a hybrid search engine, per query.

    The engine has a lexical part (BM25 over the pool: accessories and keyword-stuffed
    listings that repeat the query's words rank high) and a "semantic" part (the query's leaf
    ranked by hidden relevance plus noise, sd ``ENGINE_SEMANTIC_NOISE``).  Each query gets
    ``judgments_per_query`` products: a ``lexical_share`` of them sampled from the lexical
    top ``ENGINE_TOP``, the rest from the semantic top, both favouring the first ranks; the
    best semantic result is always judged, so every query has a positive when its leaf has one.
    """
    lo, hi = prof.judgments_per_query
    pool_leaf = leaf[pool]
    by_leaf = [pool[pool_leaf == li] for li in range(len(LEAVES))]
    judged, grades = [], []
    empty = np.zeros(0, dtype=np.int64)
    for qi, ql in enumerate(q_leaf):
        total = min(int(rng.integers(lo, hi + 1)), len(pool))
        same = by_leaf[ql]
        rel = mp_rel(qi, same) if len(same) else np.zeros(0)
        sem = same[np.argsort(-(rel + rng.normal(0.0, ENGINE_SEMANTIC_NOISE, len(same))), kind="stable")][:ENGINE_TOP]
        lex = pool[engine.top(str(q_text[qi]), ENGINE_TOP)]
        first = sem[:1]
        n_lex = int(rng.binomial(total - len(first), prof.lexical_share))
        from_lex = _sample_ranked(lex, n_lex, rng, first)
        taken = np.concatenate([first, from_lex]).astype(np.int64)
        from_sem = _sample_ranked(sem, total - len(taken), rng, taken)
        picked = np.concatenate([taken, from_sem]).astype(np.int64)
        if len(picked) < total:  # small pools: top up from the engine's lists, then anything
            rest = np.concatenate([sem, lex, rng.permutation(pool)]).astype(np.int64)
            rest = pd.unique(rest[~np.isin(rest, picked)])
            picked = np.concatenate([picked, rest[: total - len(picked)]]).astype(np.int64)
        picked = rng.permutation(picked)
        judged.append(picked)
        grades.append(relevance_to_grade(mp_rel(qi, picked)) if len(picked) else empty)
    return judged, grades


def generate_marketplace(n_products: int = 2000, n_queries: int = 300, seed: int = 42,
                         start: dt.date = dt.date(2026, 11, 1), *, n_users: int = 1000,
                         new_product_fraction: float = 0.2, new_product_days: int = 14,
                         synonym_rate: float | None = None, typo_rate: float | None = None,
                         inflection_rate: float | None = None, profile: str = "default") -> Marketplace:
    """Generate a deterministic synthetic marketplace (see the module docstring for the model).

    ``new_product_fraction`` of the products are listed on days ``start + 1`` ..
    ``start + new_product_days``; the rest before ``start``.  Same arguments, same frames.
    ``profile`` is ``"default"`` or ``"realistic"`` (module docstring, "Profiles");
    ``synonym_rate``, ``typo_rate`` and ``inflection_rate`` default to the profile's rates
    (``PROFILES[profile]``: 0.3 / 0.12 / 0.15 for the default profile).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: choose one of {sorted(PROFILES)}")
    prof = PROFILES[profile]
    synonym_rate = prof.synonym_rate if synonym_rate is None else synonym_rate
    typo_rate = prof.typo_rate if typo_rate is None else typo_rate
    inflection_rate = prof.inflection_rate if inflection_rate is None else inflection_rate
    if n_products < 1 or n_queries < 1 or n_users < 1:
        raise ValueError("n_products, n_queries and n_users must be positive")
    if not 0.0 <= new_product_fraction < 1.0:
        raise ValueError("new_product_fraction must be in [0, 1)")
    start = _as_date(start)
    t0 = time.perf_counter()
    ss = np.random.SeedSequence(seed)
    r_prod, r_time, r_text, r_user, r_query, r_judge, r_noise = (np.random.default_rng(s) for s in ss.spawn(7))
    noise_key = int(r_noise.integers(0, 2**63))
    realistic = prof.accessories

    p = _products(n_products, r_prod, n_leaves=len(LEAVES) if realistic else N_CORE_LEAVES)
    created = _created(n_products, start, new_product_fraction, new_product_days, r_time)
    log.info("products: %d structured in %.1fs", n_products, time.perf_counter() - t0)
    extra: dict[str, Any] = {}
    if realistic:
        r_model, r_acc = (np.random.default_rng(s) for s in ss.spawn(2))  # after the 7 above: they stay put
        model, model_codes = _model_lines(p, r_model)
        txt = _text(p, r_text, models=model_codes[model], titles=REALISTIC_TITLES)
        fits = _accessory_text(p, txt, r_acc)
        _cross_stuffing(p, txt, r_acc, prof.cross_stuffing_rate)
        match_brand = np.where(fits >= 0, p["brand"][np.maximum(fits, 0)], p["brand"]).astype(p["brand"].dtype)
        extra = {"profile": profile, "model": model, "model_codes": model_codes, "fits": fits,
                 "match_brand": match_brand}
    else:
        txt = _text(p, r_text)
    log.info("products: text rendered in %.1fs", time.perf_counter() - t0)
    width = max(7, len(str(n_products - 1)))
    catalog = pd.DataFrame({
        "product_id": pd.Series(np.arange(n_products)).astype(str).str.zfill(width).radd("P").to_numpy(),
        "title": txt["title"],
        "description": txt["description"],
        "category": _obj([lf.path for lf in LEAVES])[p["leaf"]],
        "brand": _obj(BRANDS)[p["brand"]],
        "attributes": txt["attributes"],
        "price": p["price"],
        "created_at": pd.to_datetime(created, unit="us", utc=True),
    })
    catalog = CATALOG.conform(catalog)
    users, user_truth = _users(n_users, r_user)

    pool = np.nonzero(created < day_start_us(start + dt.timedelta(days=1)))[0]
    if realistic:
        queries, q_truth = _queries(n_queries, p, pool, r_query, synonym_rate, typo_rate, inflection_rate,
                                    model=extra["model"], model_codes=extra["model_codes"],
                                    model_query_rate=prof.model_query_rate, brand_query_rate=prof.brand_query_rate,
                                    accessory_query_keep=prof.accessory_query_keep,
                                    match_brand=extra["match_brand"])
    else:
        queries, q_truth = _queries(n_queries, p, pool, r_query, synonym_rate, typo_rate, inflection_rate)
    truth = GroundTruth(noise_key=noise_key, leaf=p["leaf"], brand=p["brand"], attrs=p["attrs"],
                        price_pct=p["price_pct"], created_us=created, judged=[], **q_truth, **user_truth, **extra)
    mp = Marketplace(seed=seed, start=start, catalog=catalog, queries=queries,
                     judgments=JUDGMENTS.conform(pd.DataFrame(columns=JUDGMENTS.names)), users=users, truth=truth)
    if realistic:
        pool_cat = catalog.iloc[pool]
        engine = _LexicalEngine((pool_cat["title"] + " " + pool_cat["title"] + " " + pool_cat["brand"] + " "
                                 + pool_cat["category"].str.rsplit(" > ", n=1).str[-1] + " "
                                 + pool_cat["description"].fillna("")).tolist())
        judged, grades = _judge_realistic(mp.relevance_by_index, queries["query"].to_numpy(dtype=object),
                                          truth.q_leaf, truth.leaf, pool, engine, r_judge, prof)
    else:
        judged, grades = _judge(mp.relevance_by_index, truth.q_leaf, truth.leaf, pool, r_judge)
    truth.judged = judged
    qtext = queries["query"].to_numpy(dtype=object)
    pid = catalog["product_id"].to_numpy(dtype=object)
    lengths = np.array([len(j) for j in judged], dtype=np.int64)
    flat = np.concatenate(judged) if judged else np.zeros(0, dtype=np.int64)
    mp.judgments = JUDGMENTS.conform(pd.DataFrame({
        "query": np.repeat(qtext, lengths),
        "product_id": pid[flat],
        "grade": np.concatenate(grades) if grades else np.zeros(0, dtype=np.int64),
        "source": "human",
    }))
    s = mp.summary()
    log.info("marketplace seed=%d profile=%s: %d products (%d on %s), %d queries, %d judgments %s, %d users in %.1fs",
             seed, profile, s["products"], s["products_on_start"], start, s["queries"], s["judgments"], s["grades"],
             s["users"], time.perf_counter() - t0)
    return mp

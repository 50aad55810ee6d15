"""The likeness lab's procedural world: synthetic subjects, 32 px renderings and template captions, all from seeds.

A subject has *named intrinsic* attributes (hair and eye colour) that captions may state, and *unnamed identity
traits* (face shape, skin tone, eye spacing, hair style, a mark, a shirt pattern and its hues) that no caption ever
states, so only personalisation can reproduce them. Each picture also has *variable named* attributes (glasses,
expression, scene, pose). A few hundred *famous* subjects are called by made-up two-word names whose words are single
CLIP tokens, the way Stable Diffusion learned celebrities; held-out subjects have no name and never share a famous
subject's (or an anonymous pretraining person's) discrete look.

Layout of a 32 x 32 picture without jitter (rows from the top; jitter moves the subject a pixel, pose one or two):
columns 0-2 and 29-31 above row 25 are always the scene; hair from row ~2 (a bun from row 0) to row 8, long hair
down the sides; forehead mark rows 9-10; eye band rows 11-14 (eyes on 12-13, glasses frames around them); cheek marks
and nose rows 15-16; mouth rows 18-20; shoulders and the shirt pattern from row 25 down.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 32  # pictures are SIZE x SIZE RGB
SLOT = "{}"  # the pack's prompt slot; equals core.protocols.SLOT (not imported: that module needs torch)

Colour = tuple[int, int, int]

HAIR_COLOURS: dict[str, Colour] = {
    "black": (22, 22, 28),
    "brown": (112, 68, 32),
    "blonde": (232, 202, 108),
    "red": (196, 48, 28),
    "white": (238, 238, 238),
    "blue": (36, 88, 224),
}
EYE_COLOURS: dict[str, Colour] = {"brown": (104, 56, 20), "blue": (30, 110, 240), "green": (30, 176, 56)}

INTRINSIC_ATTRIBUTES = ("hair", "eyes")  # fixed per subject; captions may state them
VARIABLE_ATTRIBUTES = ("glasses", "expression", "scene", "pose")  # chosen per picture
NAMED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair": tuple(HAIR_COLOURS),
    "eyes": tuple(EYE_COLOURS),
    "glasses": ("without", "with"),
    "expression": ("neutral", "smiling"),
    "scene": ("plain", "beach", "forest", "city", "snow"),
    "pose": ("front", "left", "right"),  # left/right: the face turned toward the picture's left/right edge
}
DEFAULT_VARIABLE: dict[str, str] = {"glasses": "without", "expression": "neutral", "scene": "plain", "pose": "front"}

# The unnamed identity traits, each a float in [0, 1]; rendering is a deterministic function of them.
TRAIT_NAMES: tuple[str, ...] = (
    "face_width",  # face ellipse half-width 6.5..9.5 px (anti-aliased edge, so every value shows)
    "face_length",  # face ellipse half-height 8..10 px
    "skin_tone",  # 0 pale (248, 218, 190) .. 1 dark (110, 72, 48), linear
    "eye_spacing",  # eye centres 3..5 px either side of the face's middle, rounded to whole pixels
    "hair_style",  # discrete, HAIR_STYLES[floor(4 v)]
    "mark_place",  # discrete, MARK_PLACES[floor(4 v)]; a 4 x 2 px spot
    "mark_hue",  # the mark's hue, 0.85 v on the HSV circle (no wrap-around), saturated; unused without a mark
    "pattern_kind",  # discrete, PATTERN_KINDS[floor(4 v)]: the shirt's pattern
    "pattern_hue",  # the pattern's hue, 0.85 v, light and saturated
    "shirt_hue",  # the shirt's base hue, 0.85 v, darker and muted, so the pattern always contrasts
)
HAIR_STYLES = ("short", "long", "bob", "bun")
MARK_PLACES = ("none", "left cheek", "right cheek", "forehead")
PATTERN_KINDS = ("stripes", "columns", "dots", "checks")
TRAIT_LEVELS: dict[str, tuple[str, ...]] = {
    "hair_style": HAIR_STYLES,
    "mark_place": MARK_PLACES,
    "pattern_kind": PATTERN_KINDS,
}
HUE_RANGE = 0.85  # hue traits map to [0, 0.85] of the colour circle, so near traits mean near colours

MIN_TRAIT_DISTANCE = 0.25  # a held-out subject's traits are at least this far (L2) from every famous subject's
PROTECTED_HELD_OUT = 32  # anonymous pretraining people never share the look of the first this-many held-out subjects
FAMOUS_STREAM, HELD_OUT_STREAM = 0, 1  # seed-sequence spawn keys: independent streams for any seed

# Name words: each a single CLIP BPE token (tests check), none a word the world's captions use.
FIRST_NAMES = (
    "mara", "lena", "theo", "nina", "otto", "ada", "ezra", "milo", "vera", "hugo", "elsa", "felix", "clara", "oscar",
    "leon", "alma", "ines", "jonas", "greta", "emil", "tessa", "luca", "nora", "anton", "kira", "zara", "ivan",
    "omar", "elena", "sofia", "mila", "nico", "enzo", "rhea", "cleo", "dara", "linus", "remy", "tobias", "yuri",
)  # fmt: skip
LAST_NAMES = (
    "quinn", "hale", "nash", "sloan", "vance", "hayes", "doyle", "baxter", "fletcher", "mercer", "keller", "hoffman",
    "larsen", "novak", "rossi", "silva", "costa", "fischer", "weber", "becker", "wolfe", "hughes", "murray", "barnes",
    "harper", "ellis", "sutton", "rhodes", "garrett", "hendrix", "reyes", "ortega", "moreno", "walsh", "thorne",
)  # fmt: skip

CLASS_WORDS = ("a person", "a man", "a woman", "someone")  # how anonymous people are called
PREFIXES = ("a photo of", "a picture of", "a portrait of", "a close-up of", "an image of", "a photograph of")
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "glasses": {"with": ("wearing glasses", "with glasses"), "without": ("without glasses",)},
    "expression": {"smiling": ("smiling", "with a big smile"), "neutral": ("with a neutral face",)},
    "scene": {
        "plain": ("on a plain background",),
        "beach": ("on a beach", "at the beach"),
        "forest": ("in a forest", "in the forest"),
        "city": ("in a city", "in the city"),
        "snow": ("in the snow",),
    },
    "pose": {"front": ("facing front",), "left": ("facing left",), "right": ("facing right",)},
}


@dataclass(frozen=True, eq=False)
class Subject:
    """A synthetic person: named intrinsic attributes captions may state, and identity traits none states."""

    hair: str  # one of NAMED_ATTRIBUTES["hair"]
    eyes: str  # one of NAMED_ATTRIBUTES["eyes"]
    traits: np.ndarray  # (len(TRAIT_NAMES),) floats in [0, 1], read-only; see TRAIT_NAMES
    name: str | None = None  # a famous subject's two-word name; None for held-out and anonymous people

    def __post_init__(self) -> None:
        """Check the attributes and freeze a float copy of the traits."""
        _check_value("hair", self.hair)
        _check_value("eyes", self.eyes)
        traits = np.array(self.traits, dtype=np.float64).reshape(-1)
        if traits.shape != (len(TRAIT_NAMES),) or not np.all((traits >= 0) & (traits <= 1)):
            raise ValueError(f"traits: need {len(TRAIT_NAMES)} floats in [0, 1] ({', '.join(TRAIT_NAMES)})")
        traits.setflags(write=False)
        object.__setattr__(self, "traits", traits)

    def __eq__(self, other: object) -> bool:
        """Same name, intrinsic attributes and traits."""
        if not isinstance(other, Subject):
            return NotImplemented
        same = (self.name, self.hair, self.eyes) == (other.name, other.hair, other.eyes)
        return same and bool(np.array_equal(self.traits, other.traits))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking array field: not hashable

    def trait(self, trait_name: str) -> float:
        """One trait's value in [0, 1]."""
        return float(self.traits[TRAIT_NAMES.index(trait_name)])

    def level(self, trait_name: str) -> str:
        """A discrete trait's level name (hair_style, mark_place or pattern_kind)."""
        return level_of(trait_name, self.trait(trait_name))

    def intrinsic(self) -> dict[str, str]:
        """The named intrinsic attributes: {"hair": ..., "eyes": ...}."""
        return {"hair": self.hair, "eyes": self.eyes}

    def signature(self) -> tuple[str, ...]:
        """The discrete look: hair, eyes and every discrete trait level; no two famous subjects share one."""
        return (self.hair, self.eyes) + tuple(self.level(trait_name) for trait_name in TRAIT_LEVELS)


def _check_value(attribute: str, value: str) -> None:
    """Raise ValueError unless value is one of the named attribute's values."""
    if attribute not in NAMED_ATTRIBUTES:
        raise ValueError(f"attribute: '{attribute}' is not one of {', '.join(NAMED_ATTRIBUTES)}")
    if value not in NAMED_ATTRIBUTES[attribute]:
        raise ValueError(f"{attribute}: '{value}' is not one of {', '.join(NAMED_ATTRIBUTES[attribute])}")


def level_of(trait_name: str, value: float) -> str:
    """The level name a discrete trait value falls in."""
    levels = TRAIT_LEVELS[trait_name]
    return levels[min(int(value * len(levels)), len(levels) - 1)]


def level_value(trait_name: str, level: str) -> float:
    """The canonical trait value (the bin's middle) of a discrete trait's level."""
    levels = TRAIT_LEVELS[trait_name]
    return (levels.index(level) + 0.5) / len(levels)


def trait_distance(a: Subject, b: Subject) -> float:
    """Euclidean distance between two subjects' trait vectors."""
    return float(np.linalg.norm(a.traits - b.traits))


def _stream(seed: int, stream: int) -> np.random.Generator:
    """An independent generator for one of the world's seed streams."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


# --- subjects ---------------------------------------------------------------------------------------------------


def random_traits(rng: np.random.Generator) -> np.ndarray:
    """A trait vector: continuous traits uniform in [0, 1], discrete ones at a uniformly drawn level's middle."""
    traits = rng.random(len(TRAIT_NAMES))
    for trait_name, levels in TRAIT_LEVELS.items():
        traits[TRAIT_NAMES.index(trait_name)] = (int(rng.integers(len(levels))) + 0.5) / len(levels)
    return traits


def random_subject(rng: np.random.Generator, name: str | None = None) -> Subject:
    """A subject with uniformly drawn hair, eyes and traits."""
    hair = NAMED_ATTRIBUTES["hair"][int(rng.integers(len(HAIR_COLOURS)))]
    eyes = NAMED_ATTRIBUTES["eyes"][int(rng.integers(len(EYE_COLOURS)))]
    return Subject(hair=hair, eyes=eyes, traits=random_traits(rng), name=name)


def all_names() -> list[str]:
    """Every possible famous name, "First Last", in a fixed order."""
    return [f"{first.title()} {last.title()}" for first in FIRST_NAMES for last in LAST_NAMES]


def max_distinct_subjects() -> int:
    """How many subjects with pairwise different signatures the world has."""
    count = len(HAIR_COLOURS) * len(EYE_COLOURS)
    for levels in TRAIT_LEVELS.values():
        count *= len(levels)
    return count


def famous_subjects(count: int = 300, seed: int = 0) -> list[Subject]:
    """The world's famous people: unique two-word names, pairwise different signatures."""
    names = all_names()
    if not 0 <= count <= min(len(names), max_distinct_subjects() // 2):
        raise ValueError(f"count: the world has room for 0..{min(len(names), max_distinct_subjects() // 2)} famous")
    rng = _stream(seed, FAMOUS_STREAM)
    chosen_names = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
    subjects: list[Subject] = []
    seen: set[tuple[str, ...]] = set()
    while len(subjects) < count:
        subject = random_subject(rng, name=chosen_names[len(subjects)])
        if subject.signature() not in seen:
            seen.add(subject.signature())
            subjects.append(subject)
    return subjects


def _is_new(subject: Subject, others: Sequence[Subject], min_distance: float) -> bool:
    """True when no other subject shares its signature or lies within min_distance in traits."""
    signature = subject.signature()
    return all(o.signature() != signature and trait_distance(o, subject) >= min_distance for o in others)


def held_out_subjects(count: int = 8, seed: int = 1, famous: Sequence[Subject] | None = None) -> list[Subject]:
    """Nameless subjects from the famous ones' distribution, never sharing a famous signature or near one's traits.

    Drawn one after another from their own seed stream, so the first k of a longer list are the k-subject list.
    """
    famous = famous_subjects() if famous is None else famous
    rng = _stream(seed, HELD_OUT_STREAM)
    subjects: list[Subject] = []
    for _ in range(100_000):
        if len(subjects) == count:
            return subjects
        candidate = random_subject(rng)
        if _is_new(candidate, famous, MIN_TRAIT_DISTANCE) and _is_new(candidate, subjects, 0.0):
            subjects.append(candidate)
    raise ValueError(f"count: could not find {count} held-out subjects distinct from {len(famous)} famous ones")


def sample_subject() -> Subject:
    """The lab's sample subject for the README demo: red hair, green eyes, a bun, a right-cheek mark, stripes."""
    traits = {
        "face_width": 0.8,
        "face_length": 0.3,
        "skin_tone": 0.35,
        "eye_spacing": 0.5,
        "hair_style": level_value("hair_style", "bun"),
        "mark_place": level_value("mark_place", "right cheek"),
        "mark_hue": 0.75 / HUE_RANGE,  # violet
        "pattern_kind": level_value("pattern_kind", "stripes"),
        "pattern_hue": 0.15 / HUE_RANGE,  # yellow
        "shirt_hue": 0.55 / HUE_RANGE,  # teal-blue
    }
    return Subject(hair="red", eyes="green", traits=np.array([traits[t] for t in TRAIT_NAMES]))


def celebrity_names(subjects: Sequence[Subject]) -> list[str]:
    """The names of the named subjects, in order: the lab's celebrity list for Cross Initialization."""
    return [s.name for s in subjects if s.name is not None]


@lru_cache(maxsize=1)
def protected_signatures() -> frozenset[tuple[str, ...]]:
    """Signatures anonymous pretraining people never have: the sample subject's and the first held-out subjects'."""
    protected = held_out_subjects(PROTECTED_HELD_OUT) + [sample_subject()]
    return frozenset(s.signature() for s in protected)


def anonymous_subject(rng: np.random.Generator) -> Subject:
    """A random nameless person for pretraining, never with a protected (held-out or sample) signature."""
    while True:
        subject = random_subject(rng)
        if subject.signature() not in protected_signatures():
            return subject


# --- rendering ----------------------------------------------------------------------------------------------------

_ROW, _COL = (grid.astype(np.float64) for grid in np.mgrid[0:SIZE, 0:SIZE])  # pixel (r, c) covers [c, c+1) x [r, r+1)


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Each pixel's coverage by the rectangle [x0, x1) x [y0, y1)."""
    cover_x = np.clip(np.minimum(_COL + 1, x1) - np.maximum(_COL, x0), 0, 1)
    cover_y = np.clip(np.minimum(_ROW + 1, y1) - np.maximum(_ROW, y0), 0, 1)
    return cover_x * cover_y


def _ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Each pixel's approximate coverage by an axis-aligned ellipse (one-pixel soft edge)."""
    radius = np.sqrt(((_COL + 0.5 - cx) / ax) ** 2 + ((_ROW + 0.5 - cy) / ay) ** 2)
    return np.clip((1 - radius) * min(ax, ay) + 0.5, 0, 1)


def _above(y: float) -> np.ndarray:
    """Each pixel's fraction above the horizontal line at height y."""
    return np.clip(y - _ROW, 0, 1)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: Sequence[float]) -> None:
    """Blend colour into canvas where mask (0..1) covers it, in place."""
    canvas += mask[..., None] * (np.asarray(colour, dtype=np.float64) - canvas)


def _hsv(hue: float, saturation: float, value: float) -> Colour:
    """An HSV colour as 0..255 RGB."""
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def skin_colour(skin_tone: float) -> np.ndarray:
    """The skin colour of a skin_tone trait value."""
    pale, dark = np.array([248.0, 218.0, 190.0]), np.array([110.0, 72.0, 48.0])
    return pale + skin_tone * (dark - pale)


def _background(scene: str, phase: int) -> np.ndarray:
    """The scene's background picture; phase (0..6) shifts its pattern sideways."""
    canvas = np.zeros((SIZE, SIZE, 3))
    col = (_COL + phase) % SIZE
    if scene == "plain":
        canvas[:] = (150, 150, 154)
    elif scene == "beach":
        canvas[:] = (120, 196, 246)  # sky
        _paint(canvas, _rect(0, SIZE, 11, 17), (30, 112, 190))  # sea
        _paint(canvas, _rect(0, SIZE, 15, 16) * ((col // 3) % 2), (200, 230, 250))  # surf
        _paint(canvas, _rect(0, SIZE, 17, SIZE), (236, 206, 134))  # sand
    elif scene == "forest":
        canvas[:] = (30, 88, 38)
        _paint(canvas, _rect(0, SIZE, 0, 9) * (((col // 3) + (_ROW // 3)) % 2), (78, 156, 60))  # foliage
        _paint(canvas, _rect(0, SIZE, 8, SIZE) * (col % 7 < 2), (104, 66, 34))  # trunks
        _paint(canvas, _rect(0, SIZE, 29, SIZE), (64, 46, 28))  # ground
    elif scene == "city":
        canvas[:] = (38, 38, 74)  # night sky
        heights = np.array([15, 21, 11, 18, 24, 13, 20])
        tops = SIZE - heights[(col // 5).astype(int) % len(heights)]
        building = (_ROW >= tops).astype(np.float64)
        _paint(canvas, building, (92, 92, 108))
        _paint(canvas, building * ((col % 3 == 1) & (_ROW % 3 == 1) & (_ROW > tops)), (246, 214, 96))  # windows
    elif scene == "snow":
        canvas[:] = (200, 216, 238)  # pale sky
        _paint(canvas, ((col * 7 + _ROW * 3) % 11 == 0).astype(np.float64), (255, 255, 255))  # flakes
        _paint(canvas, _rect(0, SIZE, 21, SIZE), (246, 248, 252))  # snowfield
        _paint(canvas, _rect(0, SIZE, 21, 22), (176, 190, 214))  # horizon shadow
    else:
        _check_value("scene", scene)
    return canvas


def _shirt_pattern(kind: str, dx: int, dy: int) -> np.ndarray:
    """Where the shirt shows its pattern colour (0/1), moving with the subject's whole-pixel offset."""
    x, y = _COL - dx, _ROW - dy
    if kind == "stripes":
        return ((y // 2) % 2 == 0).astype(np.float64)  # horizontal, 2 px on 2 px off
    if kind == "columns":
        return ((x // 2) % 2 == 0).astype(np.float64)  # vertical stripes
    if kind == "dots":
        return ((x % 4 < 2) & (y % 4 < 2)).astype(np.float64)  # 2 x 2 dots every 4 px
    return (((x // 2) + (y // 2)) % 2 == 0).astype(np.float64)  # checks: a 2 px checkerboard


def _hair_masks(style: str, cx: float, cy: float, a: float, b: float, back_dx: float) -> tuple[np.ndarray, ...]:
    """(behind-the-face mask, over-the-face cap mask) of a hair style for a face ellipse at (cx, cy) of size a x b."""
    hairline = cy - b + 2.5
    cap = _ellipse(cx, cy, a + 1, b + 1) * _above(hairline)
    bx = cx + back_dx
    if style == "short":
        back = _ellipse(bx, cy, a + 1, b + 1) * _above(cy - 1)
    elif style == "long":
        back = np.maximum(
            _ellipse(bx, cy, a + 1.5, b + 1) * _above(cy), _rect(bx - a - 2, bx + a + 2, cy - 2, cy + b + 3)
        )
    elif style == "bob":
        back = _ellipse(bx, cy - 1, a + 3, b + 1.5) * _above(cy + 2.5)
    else:  # bun: a short cut and a knot on top
        back = np.maximum(_ellipse(bx, cy, a + 1, b + 1) * _above(cy - 1), _ellipse(cx, cy - b - 1.5, 2.6, 2.6))
    return back, cap


def check_variable(variable: Mapping[str, str]) -> dict[str, str]:
    """The full variable attributes: defaults for missing ones; ValueError for unknown names or values."""
    unknown = set(variable) - set(VARIABLE_ATTRIBUTES)
    if unknown:
        raise ValueError(f"variable: {', '.join(sorted(unknown))} not among {', '.join(VARIABLE_ATTRIBUTES)}")
    full = {**DEFAULT_VARIABLE, **variable}
    for attribute, value in full.items():
        _check_value(attribute, value)
    return full


@dataclass(frozen=True)
class Jitter:
    """How one picture is shifted (whole pixels) and lit: the background's phase and a brightness factor."""

    dx: int = 0
    dy: int = 0
    phase: int = 0
    brightness: float = 1.0


def draw_jitter(rng: np.random.Generator | None) -> Jitter:
    """A random jitter (±1 px, background phase, brightness ±8%), or none when rng is None."""
    if rng is None:
        return Jitter()
    dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
    return Jitter(dx, dy, int(rng.integers(0, 7)), 1.0 + float(rng.uniform(-0.08, 0.08)))


def render(subject: Subject, variable: Mapping[str, str], rng: np.random.Generator | None = None) -> np.ndarray:
    """A (32, 32, 3) uint8 picture of subject; rng adds jitter (±1 px, background phase, brightness), None none."""
    return render_at(subject, check_variable(variable), draw_jitter(rng))


def render_at(subject: Subject, variable: Mapping[str, str], jitter: Jitter) -> np.ndarray:
    """The picture of subject with a given jitter; variable: a full, checked one (every variable attribute)."""
    canvas = _background(variable["scene"], jitter.phase)
    _paint_subject(canvas, subject, variable, jitter.dx, jitter.dy)
    return np.clip(np.rint(canvas * jitter.brightness), 0, 255).astype(np.uint8)


_TURN = {"front": 0, "left": -1, "right": 1}  # pixels a pose moves the face (features move one more)


def _face_ellipse(subject: Subject, pose: str, dx: int, dy: int) -> tuple[float, float, float, float]:
    """The face's centre and half-axes (cx, cy, a, b) in pixels."""
    turn = _TURN[pose]
    return 16.0 + dx + turn, 14.0 + dy, 6.5 + 3 * subject.trait("face_width"), 8 + 2 * subject.trait("face_length")


def face_mask(subject: Subject, variable: Mapping[str, str], jitter: Jitter) -> np.ndarray:
    """(32, 32) float in [0, 1]: how much of each pixel the face ellipse covers (the eyes, mouth and a hair cap
    painted over it included; the neck, shirt and hair around it not); variable: a full, checked one."""
    cx, cy, a, b = _face_ellipse(subject, variable["pose"], jitter.dx, jitter.dy)
    return _ellipse(cx, cy, a, b)


def _paint_subject(canvas: np.ndarray, subject: Subject, variable: Mapping[str, str], dx: int, dy: int) -> None:
    """Paint the subject (hair, neck, shirt, face, features) onto the background, in place."""
    turn = _TURN[variable["pose"]]
    cx, cy, a, b = _face_ellipse(subject, variable["pose"], dx, dy)  # features move a further pixel toward the turn
    fx = cx + turn
    skin = skin_colour(subject.trait("skin_tone"))
    hair = HAIR_COLOURS[subject.hair]
    back, cap = _hair_masks(subject.level("hair_style"), cx, cy, a, b, back_dx=-turn)
    _paint(canvas, back, hair)
    _paint(canvas, _rect(cx - 3, cx + 3, cy + b - 3, SIZE), skin * 0.86)  # neck
    _paint_shirt(canvas, subject, int(cx - 16), dy)
    _paint(canvas, _ellipse(cx, cy, a, b), skin)
    _paint(canvas, cap, hair)
    offset = min(round(3 + 2 * subject.trait("eye_spacing")), int(a - 2.5))
    _paint_eyes(canvas, subject, fx, cy, offset, variable["glasses"] == "with")
    _paint(canvas, _rect(fx + turn - 1, fx + turn + 1, cy + 1, cy + 3), skin * 0.8)  # nose, pointing into the turn
    _paint_mouth(canvas, fx, cy, variable["expression"] == "smiling")
    _paint_mark(canvas, subject, fx, cy, offset)


def _paint_shirt(canvas: np.ndarray, subject: Subject, dx: int, dy: int) -> None:
    """Shoulders in the shirt hue with the pattern in the pattern hue."""
    shoulders = _ellipse(16.0 + dx, 36.0 + dy, 13, 11)
    _paint(canvas, shoulders, _hsv(HUE_RANGE * subject.trait("shirt_hue"), 0.55, 0.42))
    pattern = _shirt_pattern(subject.level("pattern_kind"), dx, dy)
    _paint(canvas, shoulders * pattern, _hsv(HUE_RANGE * subject.trait("pattern_hue"), 0.8, 0.96))


def _paint_eyes(canvas: np.ndarray, subject: Subject, fx: float, cy: float, offset: int, glasses: bool) -> None:
    """Two eyes (4 x 2 white, 2 x 2 iris) on rows cy-2..cy, and glasses (1 px dark frames and a bridge) around them."""
    for centre in (fx - offset, fx + offset):
        _paint(canvas, _rect(centre - 2, centre + 2, cy - 2, cy), (246, 246, 246))
        _paint(canvas, _rect(centre - 1, centre + 1, cy - 2, cy), EYE_COLOURS[subject.eyes])
        if glasses:
            frame = _rect(centre - 3, centre + 3, cy - 3, cy + 1) - _rect(centre - 2, centre + 2, cy - 2, cy)
            _paint(canvas, frame, (14, 14, 20))
    if glasses:
        _paint(canvas, _rect(fx - offset + 3, fx + offset - 3, cy - 2, cy - 1), (14, 14, 20))  # bridge


def _paint_mouth(canvas: np.ndarray, fx: float, cy: float, smiling: bool) -> None:
    """A closed 4 px mouth, or a 6 px open smile with teeth and raised corners."""
    if not smiling:
        _paint(canvas, _rect(fx - 2, fx + 2, cy + 5, cy + 6), (128, 44, 50))
        return
    _paint(canvas, _rect(fx - 3, fx + 3, cy + 5, cy + 7), (84, 20, 30))
    _paint(canvas, _rect(fx - 2, fx + 2, cy + 5, cy + 6), (246, 246, 240))  # teeth
    _paint(canvas, _rect(fx - 4, fx - 3, cy + 4, cy + 5), (84, 20, 30))
    _paint(canvas, _rect(fx + 3, fx + 4, cy + 4, cy + 5), (84, 20, 30))


def _paint_mark(canvas: np.ndarray, subject: Subject, fx: float, cy: float, offset: int) -> None:
    """The subject's 4 x 2 px mark on a cheek or the forehead, if it has one."""
    place = subject.level("mark_place")
    if place == "none":
        return
    spots = {"left cheek": (fx - offset, cy + 1), "right cheek": (fx + offset, cy + 1), "forehead": (fx, cy - 5)}
    centre_x, top = spots[place]
    colour = _hsv(HUE_RANGE * subject.trait("mark_hue"), 0.9, 0.9)
    _paint(canvas, _rect(centre_x - 2, centre_x + 2, top, top + 2), colour)


# --- captions -----------------------------------------------------------------------------------------------------


def random_variable(rng: np.random.Generator) -> dict[str, str]:
    """Uniformly drawn variable attributes."""
    return {attr: _pick(NAMED_ATTRIBUTES[attr], rng) for attr in VARIABLE_ATTRIBUTES}


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One of options, uniformly."""
    return options[int(rng.integers(len(options)))]


def describe(
    variable: Mapping[str, str],
    who: str,
    intrinsic: Subject | None,
    rng: np.random.Generator,
    detail: float = 0.7,
    intrinsic_probability: float = 0.3,
) -> tuple[str, dict[str, str]]:
    """A caption and the attributes it states: each variable one with probability detail, each intrinsic one with
    intrinsic_probability (only when intrinsic is given). The scene comes last, the others in random order.
    """
    variable = check_variable(variable)
    stated = {attr: variable[attr] for attr in VARIABLE_ATTRIBUTES if rng.random() < detail}
    if intrinsic is not None:
        stated.update({a: v for a, v in intrinsic.intrinsic().items() if rng.random() < intrinsic_probability})
    middle = [_pick(PHRASES[attr][stated[attr]], rng) for attr in ("pose", "expression", "glasses") if attr in stated]
    middle = [middle[i] for i in rng.permutation(len(middle))]
    looks = [f"{stated[attr]} {attr}" for attr in INTRINSIC_ATTRIBUTES if attr in stated]
    if looks:
        middle.append("with " + " and ".join(looks))
    text = f"{_pick(PREFIXES, rng)} {who}"
    if middle:
        text += " " + ", ".join(middle)
    if "scene" in stated:
        text += " " + _pick(PHRASES["scene"][stated["scene"]], rng)
    return text, stated


def caption(variable: Mapping[str, str], who: str, intrinsic: Subject | None, rng: np.random.Generator) -> str:
    """A template caption for a picture: who is a famous name, a class word such as "a person", or SLOT."""
    return describe(variable, who, intrinsic, rng)[0]


def pretraining_sample(
    subjects: Sequence[Subject],
    rng: np.random.Generator,
    famous_fraction: float = 0.7,
    bare_fraction: float = 0.15,
    look_fraction: float = 0.0,
) -> tuple[np.ndarray, str, dict]:
    """(image, caption, labels) for pretraining: famous_fraction of them a famous subject called by name (bare_fraction
    of those as just "a photo of <name>"), the rest an anonymous person called by a class word, look_fraction of those
    with a caption that states only their hair and eye colours ("a photo of a man with red hair and blue eyes").

    labels: "subject" (index into subjects, -1 for anonymous), every named attribute's value, "traits" (a copy) and
    "stated" (the attributes the caption states).
    """
    look = False
    if subjects and rng.random() < famous_fraction:
        index = int(rng.integers(len(subjects)))
        subject = subjects[index]
        who = subject.name if subject.name is not None else _pick(CLASS_WORDS, rng)
        bare = rng.random() < bare_fraction
        detail, intrinsic_probability = (0.0, 0.0) if bare else (0.7, 0.15)
    else:
        index, subject = -1, anonymous_subject(rng)
        who, detail, intrinsic_probability = _pick(CLASS_WORDS, rng), 0.7, 0.6
        look = look_fraction > 0 and rng.random() < look_fraction  # drawn only then: older recipes keep their draws
        if look:
            detail, intrinsic_probability = 0.0, 1.0
    variable = random_variable(rng)
    image = render(subject, variable, rng)
    text, stated = describe(variable, who, subject, rng, detail, intrinsic_probability)
    labels = {"subject": index, **subject.intrinsic(), **variable, "traits": subject.traits.copy()}
    labels["stated"] = tuple(stated)
    return image, text, labels


def reference_images(subject: Subject, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Reference pictures of a subject for personalisation: the first plain and default, then varied glasses,
    expression and pose, on the plain scene except every fourth (another scene).
    """
    return [render_at(subject, variable, jitter) for variable, jitter in _reference_views(count, seed)]


def reference_face_masks(subject: Subject, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """The face masks of reference_images(subject, count, seed), picture by picture (for the face-wise loss)."""
    return [face_mask(subject, variable, jitter) for variable, jitter in _reference_views(count, seed)]


def _reference_views(count: int, seed: int) -> list[tuple[dict[str, str], Jitter]]:
    """The variable attributes and jitter of each reference picture."""
    rng = np.random.default_rng(seed)
    views = []
    for i in range(count):
        variable = dict(DEFAULT_VARIABLE) if i == 0 else random_variable(rng)
        if i % 4 == 3:
            variable["scene"] = _pick(NAMED_ATTRIBUTES["scene"][1:], rng)
        else:
            variable["scene"] = "plain"
        views.append((variable, draw_jitter(rng)))
    return views

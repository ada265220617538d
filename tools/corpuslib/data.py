"""Realistic inputs made offline: rendered text (system fonts), document pages, captchas, photos from
scikit-image's data module, speech from espeak-ng and synthesized tones.

Everything is seeded: the same seed gives the same images and sounds. The model entries
(models.py) turn these into each model's input tensors through the package's own preprocessing.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

WORDS = (
    "the of and to in is was for on that with as by at from his her this which or had are but not be "
    "have they one all were an their there been if more when will would who so no time year people "
    "way day man thing woman life child world school state family student group country problem hand "
    "part place case week company system program question work government number night point home "
    "water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door "
    "health person art war history party result change morning reason research girl guy moment air "
    "teacher force education river station market garden letter window paper table music order "
    "Monday London Paris Berlin Tokyo March April invoice total amount date account address phone"
).split()

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back as soon as you get this message.",
    "The weather today is cloudy with a chance of rain in the afternoon.",
    "Our train leaves the station at half past seven tomorrow morning.",
    "She bought three apples, two oranges and a loaf of bread.",
    "Numbers like forty two and one thousand nine hundred are easy to say.",
    "Turn left at the second traffic light and keep going straight.",
    "Music played softly in the background while they talked.",
    "I would like to book a table for four people on Friday evening.",
    "The meeting has been moved to the large room on the third floor.",
    "Learning a new language takes patience and a lot of practice.",
    "Can you hear the birds singing outside the open window?",
    "The library closes early on Sundays and public holidays.",
    "He wrote his name at the bottom of the page and signed it.",
    "Bright stars filled the sky above the quiet mountain village.",
    "Remember to save your work before you close the program.",
)

# espeak-ng voices (language and variant) used for speech; all ship with espeak-ng's data.
VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f4", "de", "fr", "es", "it", "en+m7", "en-us+f2")

PHOTO_NAMES = (
    "astronaut", "cat", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
    "retina", "rocket", "camera", "coins", "moon", "brick", "grass", "gravel", "horse", "clock",
)


def fonts() -> List[Path]:
    """The DejaVu TrueType fonts of this machine (sorted, so that seeds pick the same font)."""
    found = sorted(FONT_DIR.glob("DejaVu*.ttf")) or sorted(Path("/usr/share/fonts").rglob("*.ttf"))
    if not found:
        raise RuntimeError("no TrueType fonts under /usr/share/fonts: apt-get install fonts-dejavu-core")
    return [f for f in found if "ExtraLight" not in f.name and "Math" not in f.name] or found


@functools.lru_cache(maxsize=256)
def font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached PIL font."""
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=1)
def photos() -> tuple:
    """Photos bundled with scikit-image (no download), as RGB uint8 arrays."""
    import skimage.data

    out = []
    for name in PHOTO_NAMES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return tuple(out)


def photo_crop(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random crop of a random photo, resized to ``size`` = (width, height), RGB uint8."""
    img = photos()[int(rng.integers(len(photos())))]
    h, w = img.shape[:2]
    scale = rng.uniform(0.5, 1.0)
    ch, cw = max(16, int(h * scale)), max(16, int(w * scale))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize(size, Image.BILINEAR)
    return np.asarray(crop)


def words(rng: np.random.Generator, n: int) -> str:
    """``n`` random words, some capitalized, some numbers or punctuation."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.12:
            out.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 5))))))
        else:
            w = WORDS[int(rng.integers(len(WORDS)))]
            out.append(w.capitalize() if r < 0.3 else w)
    text = " ".join(out)
    return text + "." if rng.random() < 0.3 else text


def _color(rng: np.random.Generator, dark: bool) -> tuple:
    lo, hi = (0, 90) if dark else (170, 256)
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


def text_line(rng: np.random.Generator, text: str, height: int = 48) -> np.ndarray:
    """A cropped text-line image (RGB uint8) about ``height`` pixels tall: dark text on a light
    background (plain, noisy or a photo), as a line detector would cut it from a page."""
    fnt = font(str(fonts()[int(rng.integers(len(fonts())))]), int(height * rng.uniform(0.55, 0.8)))
    left, top, right, bottom = fnt.getbbox(text)
    pad = int(height * 0.15)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    if rng.random() < 0.3:
        bg = Image.fromarray(photo_crop(rng, (max(w, 8), max(h, 8))))
        bg = Image.blend(bg, Image.new("RGB", bg.size, (255, 255, 255)), 0.75)
    else:
        bg = Image.new("RGB", (w, h), _color(rng, dark=False))
    draw = ImageDraw.Draw(bg)
    draw.text((pad - left, pad - top), text, font=fnt, fill=_color(rng, dark=True))
    img = np.asarray(bg).astype(np.float32)
    img += rng.normal(0, rng.uniform(0, 8), img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return np.asarray(out)


def page(rng: np.random.Generator, size: tuple[int, int], layout: bool = True) -> tuple[np.ndarray, list]:
    """A document page (RGB uint8, ``size`` = (width, height)): a title, paragraphs, maybe a table and
    a figure (a photo). Returns the image and the list of (kind, box) blocks drawn."""
    w, h = size
    img = Image.new("RGB", size, _color(rng, dark=False) if rng.random() < 0.5 else (255, 255, 255))
    draw = ImageDraw.Draw(img)
    margin = int(w * rng.uniform(0.05, 0.1))
    y = margin
    blocks = []
    body = int(max(9, h / rng.uniform(45, 70)))
    fpath = str(fonts()[int(rng.integers(len(fonts())))])
    title = font(fpath.replace(".ttf", "-Bold.ttf") if Path(fpath.replace(".ttf", "-Bold.ttf")).exists() else fpath,
                 int(body * rng.uniform(1.6, 2.4)))
    draw.text((margin, y), words(rng, int(rng.integers(2, 6))), font=title, fill=(0, 0, 0))
    blocks.append(("title", (margin, y, w - margin, y + title.size)))
    y += int(title.size * 1.8)
    while y < h - margin - 3 * body:
        r = rng.random()
        if layout and r < 0.2 and y < h - margin - h // 4:
            fh = int(rng.uniform(0.15, 0.3) * h)
            fw = int(rng.uniform(0.4, 0.9) * (w - 2 * margin))
            img.paste(Image.fromarray(photo_crop(rng, (fw, fh))), (margin, y))
            blocks.append(("figure", (margin, y, margin + fw, y + fh)))
            y += fh + body
        elif layout and r < 0.35 and y < h - margin - h // 5:
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            cw, rh = (w - 2 * margin) // cols, int(body * 1.8)
            for i in range(rows + 1):
                draw.line([(margin, y + i * rh), (margin + cols * cw, y + i * rh)], fill=(0, 0, 0), width=1)
            for j in range(cols + 1):
                draw.line([(margin + j * cw, y), (margin + j * cw, y + rows * rh)], fill=(0, 0, 0), width=1)
            cell = font(fpath, int(body * 0.9))
            for i in range(rows):
                for j in range(cols):
                    draw.text((margin + j * cw + 4, y + i * rh + 3), words(rng, 1)[: max(1, cw // body)], font=cell,
                              fill=(0, 0, 0))
            blocks.append(("table", (margin, y, margin + cols * cw, y + rows * rh)))
            y += rows * rh + body
        else:
            txt = font(fpath, body)
            lines = int(rng.integers(2, 7))
            top = y
            for _ in range(lines):
                if y > h - margin - body:
                    break
                line = words(rng, int(rng.integers(4, 14)))
                while txt.getlength(line) > w - 2 * margin and " " in line:
                    line = line.rsplit(" ", 1)[0]
                draw.text((margin, y), line, font=txt, fill=_color(rng, dark=True))
                y += int(body * 1.4)
            blocks.append(("text", (margin, top, w - margin, y)))
            y += body
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 3, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), blocks


def scene_with_text(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A photo with a few text lines drawn over it (signs, captions), RGB uint8 of ``size``."""
    img = Image.fromarray(photo_crop(rng, size))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(int(rng.integers(2, 7))):
        fnt = font(str(fonts()[int(rng.integers(len(fonts())))]), int(rng.integers(max(10, h // 40), max(12, h // 10))))
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h - fnt.size))
        light = rng.random() < 0.5
        draw.text((x, y), words(rng, int(rng.integers(1, 5))), font=fnt, fill=_color(rng, dark=not light),
                  stroke_width=1, stroke_fill=_color(rng, dark=light))
    return np.asarray(img)


def captcha(rng: np.random.Generator, text: str, size: tuple[int, int] = (160, 64)) -> np.ndarray:
    """A captcha-like image (RGB uint8): coloured, rotated characters over noise and lines."""
    w, h = size
    img = Image.new("RGB", size, _color(rng, dark=False))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 80))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.point((x, y), fill=_color(rng, dark=rng.random() < 0.5))
    step = w / (len(text) + 1)
    for i, ch in enumerate(text):
        fnt = font(str(fonts()[int(rng.integers(len(fonts())))]), int(h * rng.uniform(0.5, 0.75)))
        glyph = Image.new("RGBA", (h, h), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((h // 6, 0), ch, font=fnt, fill=_color(rng, dark=True) + (255,))
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        img.paste(glyph, (int(step * (i + 0.5) + rng.uniform(-4, 4)), int(rng.uniform(-6, h * 0.2))), glyph)
    for _ in range(int(rng.integers(1, 4))):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=_color(rng, dark=True), width=int(rng.integers(1, 3)))
    return np.asarray(img)


def click_captcha(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A 'click the characters' captcha: a photo with 3-6 large scattered characters (RGB uint8)."""
    img = Image.fromarray(photo_crop(rng, size))
    w, h = size
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    for _ in range(int(rng.integers(3, 7))):
        fnt = font(str(fonts()[int(rng.integers(len(fonts())))]), int(rng.integers(h // 12, h // 6)))
        tile = Image.new("RGBA", (fnt.size * 2, fnt.size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((fnt.size // 2, fnt.size // 3), alphabet[int(rng.integers(len(alphabet)))],
                                  font=fnt, fill=_color(rng, dark=rng.random() < 0.5) + (255,),
                                  stroke_width=2, stroke_fill=(255, 255, 255, 255))
        tile = tile.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR)
        img.paste(tile, (int(rng.integers(0, w - tile.width)), int(rng.integers(0, h - tile.height))), tile)
    return np.asarray(img)


def espeak(text: str, voice: str, speed: int, pitch: int, sample_rate: int) -> np.ndarray:
    """Speech synthesized by espeak-ng, as float32 in [-1, 1] at ``sample_rate``."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: apt-get update && apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        sr, x = wavfile.read(wav)
    x = x.astype(np.float32) / 32768.0
    if sr != sample_rate:
        g = np.gcd(sr, sample_rate)
        x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    return x


def speech(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A random sentence in a random espeak-ng voice, speed and pitch."""
    text = SENTENCES[int(rng.integers(len(SENTENCES)))]
    voice = VOICES[int(rng.integers(len(VOICES)))]
    return espeak(text, voice, int(rng.integers(120, 200)), int(rng.integers(20, 80)), sample_rate)


def tones(rng: np.random.Generator, sample_rate: int, seconds: float) -> np.ndarray:
    """A sequence of notes and chords (harmonic tones with attack/decay envelopes), float32 in [-1, 1]."""
    n = int(sample_rate * seconds)
    t = np.arange(n) / sample_rate
    out = np.zeros(n, np.float64)
    pos = 0
    while pos < n:
        dur = int(sample_rate * rng.uniform(0.15, 0.8))
        seg = slice(pos, min(n, pos + dur))
        tt = t[seg] - t[pos]
        env = np.minimum(1.0, tt / 0.01) * np.exp(-tt * rng.uniform(1.0, 6.0))
        root = int(rng.integers(40, 84))  # MIDI note
        for midi in [root] + ([root + 4, root + 7] if rng.random() < 0.4 else []):
            f0 = 440.0 * 2 ** ((midi - 69) / 12)
            for k in range(1, 6):
                if f0 * k < sample_rate / 2:
                    out[seg] += env * np.sin(2 * np.pi * f0 * k * tt) / k ** rng.uniform(1.0, 2.0)
        pos += dur
    out += rng.normal(0, 0.003, n)
    return (0.5 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def audio_clip(rng: np.random.Generator, sample_rate: int, seconds: float, speech_share: float = 0.5) -> np.ndarray:
    """``seconds`` of audio: espeak-ng speech (with probability ``speech_share``) or tones, zero-padded."""
    n = int(sample_rate * seconds)
    clip = speech(rng, sample_rate) if rng.random() < speech_share else tones(rng, sample_rate, seconds)
    if clip.size < n:
        clip = np.concatenate([clip, np.zeros(n - clip.size, np.float32)])
    start = int(rng.integers(0, clip.size - n + 1))
    return clip[start:start + n]


def texts_for(rng: np.random.Generator, count: int, lo: int = 1, hi: int = 6) -> List[str]:
    """``count`` random word strings of ``lo``..``hi`` words."""
    return [words(rng, int(rng.integers(lo, hi))) for _ in range(count)]


def upright_and_flipped(img: np.ndarray, flip: bool) -> np.ndarray:
    """The image, or the image rotated by 180 degrees."""
    return np.ascontiguousarray(img[::-1, ::-1]) if flip else img


def rotate90(img: np.ndarray, quarter_turns: int) -> np.ndarray:
    """The image rotated counter-clockwise by ``quarter_turns`` x 90 degrees."""
    return np.ascontiguousarray(np.rot90(img, quarter_turns))


def chars(rng: np.random.Generator, alphabet: Sequence[str], lo: int, hi: int) -> str:
    """A random string of ``lo``..``hi`` characters from ``alphabet``."""
    return "".join(alphabet[int(rng.integers(len(alphabet)))] for _ in range(int(rng.integers(lo, hi + 1))))

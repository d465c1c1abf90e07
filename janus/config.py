"""Frozen configuration dataclasses and model presets.

Every field documents its default. A config is saved as JSON inside every
checkpoint (``dataclasses.asdict``) and rebuilt with ``from_dict``, so a
checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Objective = Literal["janus", "ar", "cmlm"]
Masking = Literal["span", "uniform"]
# TrainConfig.skl_stop_grad: "" (the published objective) or "ar".
SKL_STOP_GRAD = ("", "ar")


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels in its metadata (used by the CLI)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special symbols of the joint vocabulary (fixed by ``janus.vocab``)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    unk: int = 3
    mask: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the encoder, the shared two-stream decoder and the length head."""

    vocab_size: int = _doc("size of the joint vocabulary (set from the prepared data)", default=8000)
    d_model: int = _doc("model width", default=512)
    n_heads: int = _doc("attention heads", default=4)
    ffn_dim: int = _doc("hidden size of the feed-forward blocks", default=1024)
    encoder_layers: int = _doc("encoder layers", default=6)
    decoder_layers: int = _doc("decoder layers", default=6)
    dropout: float = _doc("dropout on embeddings, sublayer outputs", default=0.3)
    attention_dropout: float = _doc("dropout on attention probabilities", default=0.0)
    activation_dropout: float = _doc("dropout after the FFN activation", default=0.0)
    max_source_positions: int = _doc("learned source positions", default=1024)
    max_target_positions: int = _doc("learned target positions", default=1024)
    length_classes: int = _doc("C, classes of the length head (max target length)", default=256)
    length_offset: bool = _doc("predict n - src_len + C/2 instead of n", default=False)
    init_std: float = _doc("std of the BERT-style normal init", default=0.02)
    specials: SpecialIds = field(default_factory=SpecialIds, metadata={"help": "special ids"})

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.length_classes < 4:
            raise ValueError(f"length_classes={self.length_classes} must be >= 4")
        if self.vocab_size <= max(dataclasses.astuple(self.specials)):
            raise ValueError(f"vocab_size={self.vocab_size} does not hold the special ids {self.specials}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if isinstance(d.get("specials"), dict):
            d["specials"] = SpecialIds(**d["specials"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # For tests and quick CPU experiments.
    "tiny": dict(d_model=64, n_heads=4, ffn_dim=128, encoder_layers=2, decoder_layers=2, dropout=0.1),
    # Studies on a CPU: hours, not days (3+3 layers of 128).
    "small": dict(d_model=128, n_heads=4, ffn_dim=512, encoder_layers=3, decoder_layers=3, dropout=0.1),
    # The published IWSLT14 setup (JANUS.md section 3).
    "iwslt": dict(d_model=512, n_heads=4, ffn_dim=1024, encoder_layers=6, decoder_layers=6, dropout=0.3),
    # Transformer base / big (Vaswani et al.).
    "base": dict(d_model=512, n_heads=8, ffn_dim=2048, encoder_layers=6, decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, ffn_dim=4096, encoder_layers=6, decoder_layers=6, dropout=0.3),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the ModelConfig of preset ``name`` ("tiny", "small", "iwslt", "base", "big") with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class LossWeights:
    """Weights of the JANUS objective (JANUS.md section 3); defaults are the published ones."""

    ar: float = _doc("label-smoothed CE of P_AR over all AR targets", default=1.0)
    nar: float = _doc("label-smoothed CE of P_NAR over the masked tokens", default=0.5)
    aux: float = _doc("label-smoothed CE of P_AUX over the masked tokens", default=0.5)
    length: float = _doc("cross entropy of the length head", default=0.1)
    skl_ar_nar: float = _doc("symmetric KL between P_AR and P_NAR", default=1.0)
    skl_ar_aux: float = _doc("symmetric KL between P_AR and P_AUX", default=3.0)
    skl_nar_aux: float = _doc("symmetric KL between P_NAR and P_AUX", default=1.0)

    @classmethod
    def for_objective(cls, objective: Objective) -> "LossWeights":
        """The weights of ``objective``: all terms for janus, the AR term for ar, NAR + length for cmlm."""
        if objective == "janus":
            return cls()
        if objective == "ar":
            return cls(nar=0, aux=0, length=0, skl_ar_nar=0, skl_ar_aux=0, skl_nar_aux=0)
        if objective == "cmlm":
            # Fairseq's CMLM weighs the length loss 0.1 as well.
            return cls(ar=0, nar=1.0, aux=0, length=0.1, skl_ar_nar=0, skl_ar_aux=0, skl_nar_aux=0)
        raise ValueError(f"unknown objective {objective!r}; choose janus, ar or cmlm")

    def scaled_except_ar(self, factor: float) -> "LossWeights":
        """These weights with every one but ``ar`` multiplied by ``factor``."""
        if factor == 1.0:
            return self
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self) if f.name != "ar"}
        )


@dataclass(frozen=True)
class PrepareConfig:
    """``janus prepare``: raw parallel text -> joint sentencepiece model + binary shards."""

    src: str = _doc("source language suffix, e.g. de (files are PREFIX.SRC)", default="de")
    tgt: str = _doc("target language suffix, e.g. en", default="en")
    trainpref: str = _doc("training text prefix (PREFIX.SRC / PREFIX.TGT)", default="")
    validpref: str = _doc("validation text prefix (optional)", default="")
    testpref: str = _doc("test text prefix (optional)", default="")
    destdir: str = _doc("output folder for the vocabulary, shards and manifest.json", default="data-bin")
    vocab_size: int = _doc("size of the joint sentencepiece vocabulary", default=8000)
    spm_model_type: str = _doc("sentencepiece model type: unigram or bpe", default="unigram")
    character_coverage: float = _doc("sentencepiece character coverage", default=1.0)
    spm_input_sentence_size: int = _doc("at most this many sentences train the vocabulary (0 = all)", default=2_000_000)
    max_len: int = _doc("pairs with more tokens than this on either side are filtered (counted)", default=254)
    threads: int = _doc("threads for sentencepiece training and encoding (0 = all cores)", default=0)


@dataclass(frozen=True)
class TrainConfig:
    """``janus train``: optimisation, batching, objective, checkpoints. Defaults follow JANUS.md."""

    data: str = _doc("folder written by `janus prepare`", default="data-bin")
    save_dir: str = _doc("checkpoint folder (resumes from its latest checkpoint)", default="checkpoints")
    preset: str = _doc("model preset: tiny, small, iwslt, base, big", default="iwslt")
    objective: str = _doc("janus, ar or cmlm", default="janus")
    masking: str = _doc("span or uniform; empty = span for janus, uniform for cmlm", default="")
    mask_ratio: float = _doc("span-masking budget ratio", default=0.7)
    span_lambda: float = _doc("Poisson mean of span lengths", default=2.0)
    max_tokens: int = _doc("token budget of one batch (per process)", default=4096)
    update_freq: int = _doc("batches accumulated per update (per process)", default=1)
    max_steps: int = _doc("stop after this many updates (0 = no limit)", default=200_000)
    max_epochs: int = _doc("stop after this many epochs (0 = no limit)", default=0)
    lr: float = _doc("peak learning rate", default=5e-4)
    warmup_steps: int = _doc("linear warmup updates of the inverse-sqrt schedule", default=10_000)
    warmup_init_lr: float = _doc("learning rate at step 0", default=1e-7)
    adam_beta1: float = _doc("Adam beta1", default=0.9)
    adam_beta2: float = _doc("Adam beta2", default=0.98)
    adam_eps: float = _doc("Adam epsilon", default=1e-8)
    weight_decay: float = _doc("decoupled weight decay", default=1e-4)
    clip_norm: float = _doc("gradient clipping max norm (0 = off)", default=0.0)
    label_smoothing: float = _doc("epsilon of the label-smoothed CE", default=0.1)
    dropout: float = _doc("override the preset's dropout (-1 = keep)", default=-1.0)
    seed: int = _doc("seed of data order, masking, init and dropout", default=1)
    amp: str = _doc(
        "autocast: auto (GPU: bf16 where it has it, else fp16; CPU: bf16 with AVX512_BF16 or AMX, else none), "
        "bf16, fp16 (GPU), none",
        default="auto",
    )
    device: str = _doc("auto, cpu, cuda or cuda:N", default="auto")
    threads: int = _doc("torch CPU threads (0 = default)", default=0)
    log_interval: int = _doc("updates between log lines", default=100)
    validate_interval: int = _doc("updates between validations (0 = once per epoch)", default=1000)
    save_interval: int = _doc("updates between checkpoints (0 = once per epoch)", default=1000)
    save_interval_minutes: float = _doc(
        "also write a checkpoint once this many minutes of wall time passed since the last one (0 = off), "
        "so that an interrupted run loses at most that much",
        default=10.0,
    )
    keep_last: int = _doc("checkpoints kept besides the best", default=5)
    max_valid_batches: int = _doc("cap on validation batches (0 = whole split)", default=0)
    progress: bool = _doc("show a tqdm progress bar", default=True)
    w_ar: float = _doc("weight of the P_AR label-smoothed CE (-1 = objective default)", default=-1.0)
    w_nar: float = _doc("weight of the P_NAR label-smoothed CE (-1 = objective default)", default=-1.0)
    w_aux: float = _doc("weight of the P_AUX label-smoothed CE (-1 = objective default)", default=-1.0)
    w_length: float = _doc("weight of the length loss (-1 = objective default)", default=-1.0)
    w_skl_ar_nar: float = _doc("weight of SKL(P_AR, P_NAR) (-1 = objective default)", default=-1.0)
    w_skl_ar_aux: float = _doc("weight of SKL(P_AR, P_AUX) (-1 = objective default)", default=-1.0)
    w_skl_nar_aux: float = _doc("weight of SKL(P_NAR, P_AUX) (-1 = objective default)", default=-1.0)
    joint_start: int = _doc(
        "janus: updates trained on the P_AR term alone (and only its rows) before the other terms start "
        "(0 = every term from the first update, the published objective)",
        default=0,
    )
    joint_ramp: int = _doc(
        "janus: updates over which the weights of every term but P_AR rise linearly from 0 to their values, "
        "after joint_start (0 = at once)",
        default=0,
    )
    skl_stop_grad: str = _doc(
        "which side of the SKL terms gets no gradient from them: '' (none: gradients into both sides, the "
        "published objective) or 'ar' (P_AR is a fixed teacher in SKL(P_AR, P_NAR) and SKL(P_AR, P_AUX))",
        default="",
    )
    nar_exposure: float = _doc(
        "janus, cmlm: share of sentences whose observed (unmasked) NAR tokens are replaced, in training only, by "
        "the model's own predictions on an all-masked canvas of their length, so that P_NAR and P_AUX learn to "
        "fill masks next to wrong tokens as mask-predict's later passes must (error exposure; 0 = off, the "
        "published objective; targets stay the references)",
        default=0.0,
    )
    nar_exposure_mask: str = _doc(
        "with nar_exposure: which tokens of an exposed sentence stay masked: random (the masking scheme's) or "
        "least-confident (as many as the scheme masks, the ones the first pass is least sure of: the state "
        "mask-predict's second pass starts from)",
        default="random",
    )
    init_from: str = _doc(
        "start from the weights of this checkpoint (a checkpoint or averaged folder, a training folder, or a "
        ".safetensors file of the same vocabulary and shapes) with a fresh optimizer, schedule and update "
        "count; ignored when save_dir holds a checkpoint to resume",
        default="",
    )

    def __post_init__(self) -> None:
        if self.skl_stop_grad not in SKL_STOP_GRAD:
            raise ValueError(f"skl_stop_grad={self.skl_stop_grad!r}: choose one of {SKL_STOP_GRAD}")
        if self.joint_start < 0 or self.joint_ramp < 0:
            raise ValueError(f"joint_start={self.joint_start}, joint_ramp={self.joint_ramp}: must be >= 0")
        if not (0.0 <= self.nar_exposure <= 1.0):
            raise ValueError(f"nar_exposure={self.nar_exposure}: a share of sentences, in [0, 1]")
        if self.nar_exposure_mask not in ("random", "least-confident"):
            raise ValueError(f"nar_exposure_mask={self.nar_exposure_mask!r}: choose random or least-confident")
        if self.nar_exposure > 0 and self.objective == "ar":
            raise ValueError(f"nar_exposure={self.nar_exposure} exposes the NAR stream; --objective ar has none")
        if (self.joint_start or self.joint_ramp) and self.objective != "janus":
            raise ValueError(
                f"joint_start/joint_ramp schedule the non-AR terms of --objective janus; "
                f"this run's objective is {self.objective}"
            )

    def joint_factor(self, step: int) -> float:
        """Factor on every weight but P_AR's at update ``step`` (1-based): 0 for the first joint_start
        updates, then a linear ramp to 1 over joint_ramp updates."""
        if step <= self.joint_start:
            return 0.0
        if self.joint_ramp <= 0:
            return 1.0
        return min(1.0, (step - self.joint_start) / self.joint_ramp)

    def loss_weights(self, step: int | None = None) -> LossWeights:
        """The objective's default weights with the w_* overrides applied; with ``step`` (1-based), those of
        that update under the joint_start / joint_ramp schedule (``joint_factor``)."""
        base = LossWeights.for_objective(self.objective)  # type: ignore[arg-type]
        over = {f.name: getattr(self, "w_" + f.name) for f in dataclasses.fields(LossWeights)}
        weights = dataclasses.replace(base, **{k: v for k, v in over.items() if v >= 0})
        return weights if step is None else weights.scaled_except_ar(self.joint_factor(step))

    def masking_kind(self) -> str:
        """The masking scheme in effect ("span" or "uniform")."""
        if self.masking:
            return self.masking
        return "uniform" if self.objective == "cmlm" else "span"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DecodeMode = Literal["ar", "nar", "spec"]


@dataclass(frozen=True)
class DecodeConfig:
    """Options of every decoding mode (``janus.fast_generate``, ``janus translate``, ``janus evaluate``).

    Lengths count target tokens without bos and eos; the source length likewise excludes eos.
    Where the model runs (device, dtype) is decided when it is loaded (``janus.Generator``).
    """

    mode: str = _doc("ar (beam search, P_AR), nar (mask-predict, P_NAR) or spec (self-speculative)", default="nar")
    beam_size: int = _doc("ar: beam width (1 = greedy search)", default=5)
    length_penalty: float = _doc("ar, spec: score = sum(log p) / (tokens + eos) ** length_penalty", default=1.0)
    max_len_a: float = _doc("at most max_len_a * source_length + max_len_b target tokens", default=1.2)
    max_len_b: int = _doc("see max_len_a", default=10)
    min_len: int = _doc("at least this many target tokens", default=1)
    iterations: int = _doc("nar: T, the number of decoder passes of mask-predict", default=10)
    length_beam: int = _doc("nar: l, candidates from the l most likely lengths", default=3)
    rerank: bool = _doc("nar: choose among the l candidates by the model's own P_AR (one more pass)", default=False)
    length_weight: float = _doc(
        "nar: choose among the l candidates by (sum of token log-probabilities + length_weight * log P(length)) / "
        "tokens; 0 = the mean token log-probability (JANUS.md), 1 = the joint log-probability of length and tokens "
        "per token (a length the head finds unlikely must earn its place)",
        default=0.0,
    )
    dedup: bool = _doc(
        "nar: collapse each run of one repeated token in the output into one token (the post-processing of "
        "much non-autoregressive work; mask-predict's own output keeps them); with rerank, P_AR scores the "
        "candidates so collapsed",
        default=False,
    )
    draft_iterations: int = _doc(
        "spec: passes a NAR draft canvas stays in (mask-predict refinements), each shared with a verification",
        default=1,
    )
    draft_policy: str = _doc(
        "spec: which passes also carry a NAR draft canvas: first (only the first pass; then the verification's "
        "own AR tokens past a rejected one are the next draft), exhausted (also after a pass that used the draft "
        "up), stall (also after a pass that accepted a single token), always (every pass)",
        default="exhausted",
    )
    draft_block: int = _doc(
        "spec: verify at most this many draft tokens per pass (fewer rows per pass, at most block + 1 tokens "
        "accepted); 0 = all of them",
        default=4,
    )
    draft_keep: bool = _doc(
        "spec: after a rejected draft token, the draft's tokens past it stay (True) or the AR's own tokens of "
        "that pass replace them (False: better where the AR's tokens repeat, e.g. random weights)",
        default=True,
    )
    draft_align: str = _doc(
        "spec: where a canvas' tokens enter the draft: lookup (after every pass, the canvas' tokens that follow "
        "the accepted prefix's last 1-3 tokens where those occur in it, so a canvas that dropped or repeated a "
        "token still drafts the rest) or position (at their own positions: fewer operations per pass)",
        default="lookup",
    )
    verify_top_beta: int = _doc(
        "spec: relaxed verification (NOT greedy's output when > 1): also accept a draft token that is among the "
        "AR's verify_top_beta best and within verify_tolerance of the best's log-probability; 1 = exact (greedy)",
        default=1,
    )
    verify_tolerance: float = _doc("spec: see verify_top_beta (nats)", default=1.0)
    history: bool = _doc("nar: return the chosen candidate's canvas after every pass", default=False)
    max_batch_size: int = _doc("sentences per batch", default=64)
    max_batch_tokens: int = _doc("source tokens (padded) per batch; 0 = no limit", default=0)
    max_source_len: int = _doc("longer sources are truncated with a warning; 0 = the model's limit", default=0)
    window: int = _doc(
        "sentences sorted by length together: the input is decoded in windows of this many sentences, in "
        "input order, and within a window batches of similar length are decoded in the order of their first "
        "sentence, so results come out in input order while the run goes; larger = fuller batches, "
        "output later; 0 = the whole input in one window",
        default=1024,
    )
    repeat_ngram: int = _doc(
        "ar, spec: degenerate-repetition guard: a hypothesis whose last n tokens, for some n in "
        "1 .. repeat_ngram, occurred repeat_times times back to back must end (only eos remains); "
        "0 = off. spec applies it exactly as greedy search does, so it still equals greedy",
        default=0,
    )
    repeat_times: int = _doc("ar, spec: see repeat_ngram (>= 2)", default=4)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.mode in ("ar", "nar", "spec"), f"mode={self.mode!r}: choose ar, nar or spec")
        check(self.beam_size >= 1, f"beam_size={self.beam_size} must be >= 1")
        check(self.iterations >= 1, f"iterations={self.iterations} must be >= 1 (it counts decoder passes)")
        check(self.length_beam >= 1, f"length_beam={self.length_beam} must be >= 1")
        check(math.isfinite(self.length_weight) and self.length_weight >= 0,
              f"length_weight={self.length_weight} must be a number >= 0")  # fmt: skip
        check(not (self.rerank and self.length_weight),
              f"length_weight={self.length_weight} with rerank: the P_AR re-ranking replaces the length-weighted "
              "choice; give one of them")  # fmt: skip
        check(self.draft_iterations >= 1, f"draft_iterations={self.draft_iterations} must be >= 1")
        check(self.draft_policy in ("first", "exhausted", "stall", "always"),
              f"draft_policy={self.draft_policy!r}: choose first, exhausted, stall or always")  # fmt: skip
        check(
            self.draft_align in ("position", "lookup"), f"draft_align={self.draft_align!r}: choose position or lookup"
        )
        check(self.draft_block >= 0, f"draft_block={self.draft_block} must be >= 0 (0 = the whole draft)")
        check(self.verify_top_beta >= 1, f"verify_top_beta={self.verify_top_beta} must be >= 1 (1 = exact)")
        check(self.verify_tolerance >= 0, f"verify_tolerance={self.verify_tolerance} must be >= 0")
        check(self.max_len_a >= 0 and self.max_len_b >= 0, f"max_len_a={self.max_len_a}, max_len_b={self.max_len_b}: "
              "both must be >= 0")  # fmt: skip
        check(self.min_len >= 0, f"min_len={self.min_len} must be >= 0")
        check(self.max_batch_size >= 1, f"max_batch_size={self.max_batch_size} must be >= 1")
        check(self.max_batch_tokens >= 0, f"max_batch_tokens={self.max_batch_tokens} must be >= 0")
        check(self.max_source_len >= 0, f"max_source_len={self.max_source_len} must be >= 0")
        check(self.window >= 0, f"window={self.window} must be >= 0 (0 = the whole input)")
        check(self.repeat_ngram >= 0, f"repeat_ngram={self.repeat_ngram} must be >= 0 (0 = off)")
        check(self.repeat_times >= 2, f"repeat_times={self.repeat_times} must be >= 2")

"""``eap``: Erasing with Adversarial Preservation, ESD's fine-tuning plus the preservation of the concept the
current edit damages most.

Each training sample:

1. ESD's sample (:meth:`~erasekit.methods.esd.method.EsdTrainer.esd_sample`): the frozen model's latent
   ``x_t`` of a concept prompt at a random step, its negatively guided target and the trained model's
   prediction; the ESD loss is taken in x̂0 space, as the official EAP code does (on velocity models
   ``x̂0 = x_t − σ v``).
2. The adversary (``eap.adversary_steps`` times): a Gumbel-softmax draw of the logits over the candidate
   concepts mixes their encodings into ``c_r``; the preservation loss
   ``MSE(x̂0_θ(x_t, c_r), x̂0_*(x_t, c_r))`` (trained vs frozen model) is *ascended* in the logits
   (Adam, ``eap.adversary_lr``), so the draw moves to the candidates the edit changes most.
3. The model loss ``ESD + α · preservation`` on a fresh draw of the updated logits (held fixed).

The candidates: the ``eap.nearest`` whole-word vocabulary tokens nearest the concept (cosine, in the first
text encoder's input embeddings; the concept's own words left out) reduced to ``eap.centres`` K-means
centres, each represented by its nearest token, or the words of ``eap.candidates``. Each candidate is put in
the context of the sampled concept prompt: its target with the anchor replaced by the candidate ("a blue disc
on gray" -> "a blue star on gray"), encoded by the family's text encoders. The words the concept prompts
have and their targets do not (the concept, its synonyms) are never candidates. The official code mixes the
*input* token embeddings and runs CLIP on them; erasekit mixes the encoder *outputs* the denoiser reads
(sequence and pooled embeddings): a one-hot draw is then a candidate's own encoding, and no per-family access
into the text encoders is needed (FLUX and SD3 have two and three of them). DiT is class-conditioned and has no text
to search, so EAP does not support it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...arch.base import Trajectory
from ...arch.guidance import Conditional
from ...config import EapConfig, EraseConfig
from ...errors import ConfigError
from ..base import register_method
from ..esd.kernels import esd_loss
from ..esd.method import EsdSample, EsdTrainer, check_esd_settings
from ..finetune import FineTuneMethod
from ..weights import WeightEditErasure
from .kernels import (
    adversarial_embedding,
    eap_losses,
    gumbel_softmax,
    kmeans_centres,
    nearest_tokens,
    preservation_loss,
)

CHANGES = "denoiser weights fine-tuned (EAP: ESD with adversarial preservation)"
#: The guidance role of the adversarial concept's encoding.
ROLE = "adversary"
#: The text-encoder outputs mixed by the Gumbel-softmax weights (the other conditional keys, attention
#: masks and position ids, are combined by :func:`mix_encodings` without weights).
MIXED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
#: Checkpoint names of the adversary's state (never denoiser parameter names: those have no prefix ``eap.``).
_STATE = "eap.adversary."


class EapErasure(WeightEditErasure):
    """The parameters EAP fine-tuned (``weights.safetensors``); applied by copying them in."""

    method = "eap"


def check_eap_settings(settings: EapConfig) -> None:
    """Refuse EAP settings it cannot run with, naming the key."""
    check_esd_settings(settings, "eap")
    if settings.preservation_weight < 0:
        raise ConfigError("eap.preservation_weight must not be negative (0 switches preservation off)")
    if not settings.adversary_lr > 0:
        raise ConfigError(f"eap.adversary_lr must be positive, got {settings.adversary_lr}")
    if settings.adversary_steps < 0:
        raise ConfigError("eap.adversary_steps must not be negative (0: the logits stay uniform)")
    if not settings.temperature > 0:
        raise ConfigError(f"eap.temperature must be positive, got {settings.temperature}")
    if settings.centres < 1 or settings.nearest < settings.centres:
        raise ConfigError(
            f"eap.centres must be at least 1 and at most eap.nearest ({settings.nearest}), got {settings.centres}"
        )


_WORD = re.compile(r"\w+")


def _spans(prompt: str, target: str) -> tuple[int, int, int]:
    """``(head, tail, words)``: how many words ``prompt`` and ``target`` share at their start and at their
    end (case-insensitive; the shared end never overlaps the start), and how many words ``target`` has."""
    p = [w.lower() for w in _WORD.findall(prompt)]
    t = [w.lower() for w in _WORD.findall(target)]
    head = 0
    while head < min(len(p), len(t)) and p[head] == t[head]:
        head += 1
    tail = 0
    while tail < min(len(p), len(t)) - head and p[len(p) - 1 - tail] == t[len(t) - 1 - tail]:
        tail += 1
    return head, tail, len(t)


def concept_span(prompt: str, target: str) -> list[str]:
    """``prompt``'s words (lower case) where it differs from its ``target``: the concept as this prompt names
    it (the concept itself, a synonym), with what differs around it (an article)."""
    head, tail, _ = _spans(prompt, target)
    words = [w.lower() for w in _WORD.findall(prompt)]
    return words[head : len(words) - tail]


def candidate_prompt(prompt: str, target: str, word: str) -> str:
    """``target`` with the part where it differs from ``prompt`` (the anchor; where the anchor is empty, the
    place the concept was dropped from) replaced by ``word``, the rest of its text kept as it is: the concept
    prompt's context around a candidate concept (``a blue disc on gray`` -> ``a blue star on gray``)."""
    head, tail, count = _spans(prompt, target)
    matches = list(_WORD.finditer(target))
    if head < count - tail:  # the anchor's words: replaced in place
        start, end = matches[head].start(), matches[count - tail - 1].end()
        return f"{target[:start]}{word}{target[end:]}"
    # no anchor: inserted where the concept was
    start = matches[head - 1].end() if head else 0
    return " ".join(f"{target[:start]} {word} {target[start:]}".split())


def is_whole_word(tokenizer: Any, token: int) -> bool:
    """Whether ``token`` is a whole word on its own: letters only (two or more) and tokenized back to exactly
    that id (not a word piece such as CLIP's ``cle``, nor a byte)."""
    text = tokenizer.decode([token]).strip()
    return len(text) > 1 and text.isalpha() and tokenizer(text, add_special_tokens=False).input_ids == [token]


def candidate_words(
    pipe: Any, concept: str, excluded_words: list[str], nearest: int, centres: int, seed: int
) -> list[str]:
    """The candidate concepts: one whole-word vocabulary token per K-means centre of the ``nearest`` whole-word
    tokens nearest ``concept`` (the mean of its tokens' input embeddings), without repeats; the tokens of
    ``concept`` and of ``excluded_words`` (its synonyms) are never candidates.

    Raises:
        ConfigError: the vocabulary has fewer than ``nearest`` such tokens.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    # the embedding matrix may have rows the tokenizer never produces (T5 pads it to a multiple of 128)
    vocabulary = encoder.get_input_embeddings().weight.detach()[: len(tokenizer)].float().cpu()
    own = [tokenizer(word, add_special_tokens=False).input_ids for word in [concept, *excluded_words]]
    exclude = torch.tensor(sorted({i for ids in own for i in ids} | set(tokenizer.all_special_ids)), dtype=torch.long)
    available = vocabulary.shape[0] - len(exclude)
    if nearest > available:
        raise ConfigError(
            f"eap.nearest must be at most {available} (this vocabulary less the concept's and the special tokens), "
            f"got {nearest}"
        )
    ranking = nearest_tokens(vocabulary[own[0]].mean(0), vocabulary, available, exclude=exclude)
    # walked nearest first, so that only about ``nearest`` tokens are decoded and tokenized again (a slow
    # tokenizer takes seconds for a whole CLIP vocabulary)
    kept: list[int] = []
    for token in ranking.tolist():
        if is_whole_word(tokenizer, token):
            kept.append(token)
            if len(kept) == nearest:
                break
    if len(kept) < nearest:
        raise ConfigError(
            f"eap.nearest must be at most {len(kept)} (this vocabulary's whole-word tokens less the concept's), "
            f"got {nearest}"
        )
    tokens = torch.tensor(kept)
    points = vocabulary[tokens]
    found = kmeans_centres(points, centres, generator=torch.Generator().manual_seed(seed))
    # each centre is represented by its nearest token not yet taken, so that no two candidates coincide
    taken: set[int] = set()
    for order in torch.cdist(found, points).argsort(dim=1):
        taken.add(next(int(tokens[j]) for j in order if int(tokens[j]) not in taken))
    return [tokenizer.decode([i]).strip() for i in sorted(taken, key=lambda i: int((tokens == i).nonzero()))]


def mix_encodings(encodings: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """One row of conditioning from the candidates' stacked encodings ``(k, …)`` and weights ``(k,)``:
    ``weights · E`` for the text-encoder outputs (:data:`MIXED_KEYS`); the other keys take the rows'
    maximum (an attention mask becomes the union of the candidates', position ids are the same in every row)."""
    mixed = {}
    for key, stacked in encodings.items():
        if key in MIXED_KEYS:
            flat = adversarial_embedding(weights.to(stacked.device, stacked.dtype), stacked.flatten(1))
            mixed[key] = flat.view(1, *stacked.shape[1:])
        else:
            mixed[key] = stacked.amax(dim=0, keepdim=True)
    return mixed


def x0_estimate(trajectory: Trajectory, state: torch.Tensor, prediction: torch.Tensor, step: int) -> torch.Tensor:
    """The clean latent ``prediction`` implies at step ``step`` for the latent state ``state`` (whose channels
    past the prediction's are a multistep solver's carried history)."""
    return trajectory.x0_estimate(state[:, : prediction.shape[1]], prediction, step)


class EapTrainer(EsdTrainer):
    """ESD's parameter sets and sample with EAP's adversary and preservation term on the shared loop."""

    erasure_class = EapErasure
    changes = CHANGES

    def __init__(
        self, pipe: Any, config: EraseConfig, output: str | Path, accelerator: Any, model_id: str | None = None
    ) -> None:
        super().__init__(pipe, config, output, accelerator, model_id)
        s = self.settings
        if not self.arch.text_conditioned or getattr(pipe, "text_encoder", None) is None:
            raise ConfigError(f"eap searches the text conditioning, and the {self.arch.family} family has none")
        # the words the concept prompts have and their targets do not (the concept, its synonyms as the
        # prompts use them) are never candidates: preserving them would undo the erasure
        named = {w for c, t in zip(self.prompts.concept, self.prompts.target, strict=True) for w in concept_span(c, t)}
        excluded = named | {w.lower() for w in [config.concept.concept, *config.concept.synonyms]}
        if s.candidates:
            self.words = list(dict.fromkeys(w.strip() for w in s.candidates if w.strip().lower() not in excluded))
            if not self.words:
                raise ConfigError("eap.candidates: every candidate is a word of the concept prompts' concept")
        else:
            seed = config.train.seed
            self.words = candidate_words(pipe, config.concept.concept, sorted(excluded), s.nearest, s.centres, seed)
        # per concept prompt (the ESD sample's row), the candidates' conditional encodings stacked
        self.candidates: list[dict[str, torch.Tensor]] = []
        for row in range(len(self.prompts.concept)):
            prompts = [candidate_prompt(self.prompts.concept[row], self.prompts.target[row], w) for w in self.words]
            encoded = self.encode(prompts)
            self.candidates.append({k: v for k, v in encoded.items() if not k.startswith("negative_")})
        # the Gumbel logits live on the CPU: their draws use a CPU generator, the same on every device
        self.logits = torch.zeros(len(self.words), requires_grad=True)
        self.adversary = torch.optim.Adam([self.logits], lr=s.adversary_lr)

    def settings_of(self, config: EraseConfig) -> EapConfig:
        self.settings: EapConfig = config.eap
        check_eap_settings(self.settings)
        return self.settings

    # ------------------------------------------------------------------ the adversary
    def adversarial_guidance(self, row: int, weights: torch.Tensor) -> Conditional:
        """The conditioning of the candidates in concept prompt ``row``'s context mixed by ``weights``."""
        return Conditional(ROLE, {ROLE: mix_encodings(self.candidates[row], weights)})

    def _draw(self, generator: torch.Generator, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_softmax(logits, self.settings.temperature, hard=self.settings.hard, generator=generator)

    def adversary_step(self, esd: EsdSample, row: int, generator: torch.Generator) -> float:
        """One ascent step of the logits on the preservation loss at ``esd``'s latent; returns that loss."""
        trajectory, z, step = esd.trajectory, esd.z, esd.step
        assert trajectory.predict is not None
        with torch.enable_grad():
            guidance = self.adversarial_guidance(row, self._draw(generator, self.logits))
            with self.original_weights():
                frozen = x0_estimate(trajectory, z, trajectory.predict(z, step, guidance), step)
            edited = x0_estimate(trajectory, z, trajectory.predict(z, step, guidance), step)
            preservation = preservation_loss(edited.float(), frozen.float())
            _, ascent = eap_losses(preservation.detach(), preservation, self.settings.preservation_weight)
            d_edited, d_frozen = torch.autograd.grad(ascent, [edited, frozen])
            # each branch is differentiated with its own weights in place: the frozen branch's saved
            # tensors are the parameters themselves, whose values original_weights() swaps
            (grad,) = torch.autograd.grad(edited, [self.logits], d_edited, retain_graph=True)
            with self.original_weights():
                (frozen_grad,) = torch.autograd.grad(frozen, [self.logits], d_frozen)
        grad = grad + frozen_grad
        if self.accelerator.num_processes > 1:  # one adversary for the whole run, as the model has one update
            grad = self.accelerator.reduce(grad.to(self.accelerator.device), reduction="mean").cpu()
        self.logits.grad = grad
        self.adversary.step()
        self.adversary.zero_grad(set_to_none=True)
        return float(preservation.detach())

    # ------------------------------------------------------------------ the loss
    def loss(self, sample: int) -> tuple[torch.Tensor, dict[str, float]]:
        esd = self.esd_sample(sample)
        trajectory, z, step = esd.trajectory, esd.z, esd.step
        assert trajectory.predict is not None
        erase = esd_loss(
            x0_estimate(trajectory, z, esd.prediction(), step).float(),
            x0_estimate(trajectory, z, esd.target, step).float(),
        )
        generator = torch.Generator().manual_seed(self.noise_seed(sample, 2))
        row = self.concept_row(sample)
        ascended = 0.0
        for _ in range(self.settings.adversary_steps):
            ascended = self.adversary_step(esd, row, generator)
        weights = self._draw(generator, self.logits.detach())
        guidance = self.adversarial_guidance(row, weights)
        with torch.no_grad(), self.original_weights():
            frozen = x0_estimate(trajectory, z, trajectory.predict(z, step, guidance), step)
        edited = x0_estimate(trajectory, z, trajectory.predict(z, step, guidance), step)
        preservation = preservation_loss(edited.float(), frozen.float())
        loss, _ = eap_losses(erase, preservation, self.settings.preservation_weight)
        return loss, {
            "timestep_index": float(step),
            "esd": float(erase.detach()),
            "preservation": float(preservation.detach()),
            "adversary_preservation": ascended,
            "adversary_top_weight": float(torch.softmax(self.logits.detach(), 0).max()),
        }

    # ------------------------------------------------------------------ state and record
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"{_STATE}logits": self.logits.detach()}
        moments = self.adversary.state.get(self.logits, {})
        state.update({f"{_STATE}{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in moments.items()})
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.logits.copy_(tensors[f"{_STATE}logits"])
        moments = {k[len(_STATE) :]: v for k, v in tensors.items() if k.startswith(_STATE) and k != f"{_STATE}logits"}
        if moments:
            self.adversary.state[self.logits] = moments

    def adversary_weights(self) -> torch.Tensor:
        """The adversary's current distribution over the candidates (the softmax of its logits)."""
        return torch.softmax(self.logits.detach(), dim=0)

    def training_record(self) -> dict[str, Any]:
        weights = self.adversary_weights()
        ranked = sorted(zip(self.words, weights.tolist(), strict=True), key=lambda pair: -pair[1])
        return {"eap_candidates": self.words, "eap_adversary": [[w, round(p, 6)] for w, p in ranked]}


@register_method
class EapMethod(FineTuneMethod):
    """EAP (Bui et al., NeurIPS 2024): ESD plus the preservation of the concept the edit damages most, found
    by a Gumbel-softmax search over the vocabulary tokens nearest the concept, alternating with the model."""

    name = "eap"
    config_class = EapConfig
    section = "eap"
    erasure_class = EapErasure
    needs_cfg = False
    changes = CHANGES
    families = ("flux", "pixart", "sd3", "unet")
    summary = "EAP: ESD plus preservation of the adversarially chosen most-damaged nearby concept"
    trainer_class = EapTrainer

    def check_settings(self, settings: Any) -> None:
        check_eap_settings(settings)


__all__ = [
    "CHANGES",
    "MIXED_KEYS",
    "EapErasure",
    "EapMethod",
    "EapTrainer",
    "candidate_words",
    "check_eap_settings",
    "mix_encodings",
]

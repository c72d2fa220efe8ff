"""Every knob of the plugin: one typed pydantic-settings model.

Server-wide values come from `PIO_FVLM_*` environment variables, read by pydantic-settings'
environment source in every vLLM process, so the API server and the workers agree; the server
default `visual_keep` can also come from vLLM's `--mm-processor-kwargs`, and every request can
name its own.
"""

from __future__ import annotations

import os
from typing import Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from .budget import validate_visual_keep

ENV_PREFIX = "PIO_FVLM_"

# What `scoring="official"` means, as the authors' code scores (see METHOD.md); each can still
# be set on its own. The gradient is taken at the output of layer K through layer K + 1, so the
# proxy runs one more layer than `proxy_layer`.
OFFICIAL_SCORING = {
    "loss_positions": "four_before_last",
    "saliency": "grad_norm",
    "nms_threshold": 0.8,
    "nms_inclusive": True,
}

# Decoder layer whose output the proxy loss reads, by number of decoder layers. The paper
# prunes LLaVA-NeXT-7B (32 layers) at layer 2; shallower models keep the same share.
_DEFAULT_PROXY_LAYER_BY_DEPTH = {32: 2, 40: 3, 60: 4, 80: 5}

# Variables with the prefix that are not settings: the metrics directory shared by the
# server's processes, the test fault injector, the set-up script's options, and the vLLM
# version gate's override.
_OTHER_ENV = {"PIO_FVLM_STATS_DIR", "PIO_FVLM_TEST_FAIL_ON_TOKENS", "PIO_FVLM_VENV", "PIO_FVLM_EXTRAS",
              "PIO_FVLM_ALLOW_UNSUPPORTED_VLLM", "PIO_FVLM_PIP_ISOLATED", "PIO_FVLM_TORCH_INDEX",
              "PIO_FVLM_RELEASE_CACHE"}


def default_proxy_layer(num_hidden_layers: int) -> int:
    if num_hidden_layers in _DEFAULT_PROXY_LAYER_BY_DEPTH:
        return _DEFAULT_PROXY_LAYER_BY_DEPTH[num_hidden_layers]
    # At least 2 where the model has the depth: the layers before the hand-off (after layer K,
    # see handoff_layer) then see every image token.
    return max(1, min(num_hidden_layers - 1, max(2, round(num_hidden_layers / 16))))


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (os.environ by default)."""

    def __init__(self, settings_cls, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self):
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class PioFvlmSettings(BaseSettings):
    """Settings of the PIO-FVLM selection pass.

    `PioFvlmSettings(...)` takes the values given and nothing else; `from_env()` reads the
    `PIO_FVLM_<FIELD>` variables (empty ones count as unset).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)

    visual_keep: float = Field(
        1.0, description="Default share of image tokens kept when a request does not say; (0, 1]."
    )
    mode: Literal["encoder_free", "encoder_involved"] = Field(
        "encoder_free",
        description="encoder_free: gradient saliency + NMS over all image tokens. "
        "encoder_involved: a VisionZip-style stage (CLS attention) first, then the gradient stage.",
    )
    selector: Literal["pio_fvlm", "uniform", "random"] = Field(
        "pio_fvlm",
        description="pio_fvlm: the method. uniform (evenly spaced) and random (seeded by the "
        "prompt) are baselines served the same way, at original positions, with no proxy pass "
        "and so no hand-off: the free-selection ceiling of speed.",
    )
    budget: Literal["ratio", "paper"] = Field(
        "ratio",
        description="ratio: an image of N tokens keeps round(N * keep). paper: the paper's "
        "tables' convention, an absolute count: every image keeps round(M * keep), M the "
        "model's largest image token count (2880 for LLaVA-NeXT: 320 at 0.111), at most N.",
    )
    scoring: Literal["project", "official"] = Field(
        "project",
        description="project: the defaults below. official: the authors' code (loss on the 4 "
        "positions before the last prompt token through layer K + 1, ||g||, NMS at >= 0.8); "
        "settings given explicitly still win.",
    )
    proxy_layer: int | None = Field(
        None, ge=1, description="K: the proxy runs decoder layers 1..K (1..K+1 with official "
        "scoring). None: per-model default."
    )
    backprop_layers: int = Field(
        1,
        ge=1,
        description="How many of the K proxy layers the gradient flows back through (1: layer-local).",
    )
    proxy_loss: Literal["logit_lens", "state"] = Field(
        "logit_lens",
        description="logit_lens: cross-entropy of the last prompt token's layer-K state, read "
        "through the final norm and LM head, against its own top-1 token. state: the layer-K "
        "state projected on its own (detached) direction.",
    )
    loss_positions: Literal["last", "four_before_last"] = Field(
        "last",
        description="Where the proxy loss reads layer K: the last prompt token, or the 4 "
        "positions before it (the authors' code).",
    )
    saliency: Literal["grad_x_normed", "grad_x_input", "grad_norm"] = Field(
        "grad_x_normed",
        description="grad_x_normed: |<dL/dn_i, n_i>| at the normed input n_i of layer K, the "
        "first-order loss change when token i leaves layer K's attention (needs backprop_layers "
        "1). grad_x_input: |<dL/dx_i, x_i>| at the residual-stream input (zero but for the "
        "RMSNorm epsilon; kept for comparison). grad_norm: ||dL/dx_i||.",
    )
    handoff_layer: int | None = Field(
        None,
        ge=0,
        description="h: the kept image tokens of a prompt's first pruned image and the text after "
        "it take over the states the unpruned prompt gives them after decoder layer h, so layers "
        "> h see what the paper's pruning inside the model gives them. 0 turns it off; at most "
        "K - backprop_layers + 1 (the proxy holds that layer's input: its output at the "
        "handed-off rows costs a fraction of a layer). None: the paper's pruning point, layer K.",
    )
    nms_threshold: float = Field(
        0.9,
        gt=-1.0,
        le=1.0,
        description="Cosine similarity above which a token is suppressed by a kept one; 1.0 turns "
        "NMS off (plain top-k by saliency).",
    )
    nms_inclusive: bool = Field(
        False, description="Suppress at similarity >= threshold instead of > threshold."
    )
    visionzip_dominant: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="encoder_involved: share of tokens the VisionZip stage keeps as dominant.",
    )
    visionzip_contextual: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="encoder_involved: share of tokens the VisionZip stage adds as merged context.",
    )

    visual_turns: Literal["incremental", "first_turn", "reselect"] = Field(
        "incremental",
        description="How a chat's later turns treat an image an earlier turn pruned, when a request "
        "does not say: incremental (the earlier turns' tokens, reused from the prefix cache, plus "
        "the tokens the new question selects among those not yet served), first_turn (the earlier "
        "turns' tokens only) or reselect (a fresh selection over the whole prompt each turn).",
    )
    turn_delta_share: float = Field(
        0.25,
        ge=0.0,
        le=8.0,
        description="incremental: tokens a later turn adds to an earlier turn's image, as a share of "
        "that image's first budget k (never more than remain unserved); 0 adds none.",
    )
    vision_cache_mb: int = Field(
        1024,
        ge=0,
        description="Host memory (MiB) per worker for vision-tower outputs, so a later question "
        "about a recently seen image runs no vision tower (an image of N tokens costs N x hidden "
        "size x dtype bytes: 23.6 MB for LLaVA-NeXT-7B's 2880 tokens in bf16); 0 turns it off.",
    )
    proxy_cache_mb: int = Field(
        2048,
        ge=0,
        description="Host memory (MiB) per worker for the proxy's states over recent selections' "
        "sequences, so a later turn's proxy pass runs its new rows only (an image costs the full "
        "proxy layers' keys, values and outputs over its sequence: about 72 MB for LLaVA-NeXT-7B's "
        "~2,950 rows in bf16 at K = 2); 0 turns it off.",
    )
    served_sets: int = Field(
        16384,
        ge=0,
        description="Kept-token sets the worker remembers (a few KB each) so a later turn selects "
        "among the tokens not yet served and a re-encoded item keeps what it kept.",
    )

    @model_validator(mode="before")
    @classmethod
    def _official_defaults(cls, values: object) -> object:
        if isinstance(values, dict) and values.get("scoring") == "official":
            return {**OFFICIAL_SCORING, **values}
        return values

    @model_validator(mode="after")
    def _normed_is_layer_local(self) -> "PioFvlmSettings":
        if self.saliency == "grad_x_normed" and self.backprop_layers != 1:
            raise ValueError(f"saliency grad_x_normed ({ENV_PREFIX}SALIENCY, the default) needs backprop_layers "
                             f"({ENV_PREFIX}BACKPROP_LAYERS) 1, got {self.backprop_layers}; set "
                             f"{ENV_PREFIX}SALIENCY to grad_x_input or grad_norm to backpropagate further")
        return self

    @field_validator("visual_keep", mode="before")
    @classmethod
    def _check_keep(cls, value: object) -> float:
        return validate_visual_keep(value)

    def proxy_layer_for(self, num_hidden_layers: int) -> int:
        """K for a model of this depth; also checks that backprop_layers fits within K."""
        k = (self.proxy_layer or default_proxy_layer(num_hidden_layers)) + (self.scoring == "official")
        if k > num_hidden_layers:
            raise ValueError(
                f"proxy_layer ({ENV_PREFIX}PROXY_LAYER) must be in [1, {num_hidden_layers - (self.scoring == 'official')}] "
                f"for this model of {num_hidden_layers} decoder layers, got {self.proxy_layer}"
                + (" (official scoring runs one more layer)" if self.scoring == "official" else "")
            )
        if self.backprop_layers > k:
            raise ValueError(
                f"backprop_layers ({ENV_PREFIX}BACKPROP_LAYERS) must be in [1, {k}] (the proxy layer K), "
                f"got {self.backprop_layers}"
            )
        return k

    def handoff_layer_for(self, num_hidden_layers: int) -> int:
        """h for a model of this depth (0: no hand-off); checks it against K - backprop_layers + 1."""
        layers = self.proxy_layer_for(num_hidden_layers)  # what the proxy runs: K, or K + 1 (official)
        top = layers - self.backprop_layers + 1
        if self.selector != "pio_fvlm":
            if self.handoff_layer:
                raise ValueError(f"handoff_layer ({ENV_PREFIX}HANDOFF_LAYER) needs selector pio_fvlm (its proxy "
                                 f"pass), got {self.selector}")
            return 0
        if self.handoff_layer is None:
            # The paper's pruning point: after layer K (official scoring runs one more layer).
            return min(top, layers - (self.scoring == "official"))
        if self.handoff_layer > top:
            raise ValueError(
                f"handoff_layer ({ENV_PREFIX}HANDOFF_LAYER) must be in [0, {top}] (proxy_layer K - "
                f"backprop_layers + 1), got {self.handoff_layer}"
            )
        return self.handoff_layer

    def server_default_keep(self, mm_processor_kwargs: Mapping | None) -> float:
        """The keep ratio of requests that do not name one: vLLM's `--mm-processor-kwargs`
        `visual_keep` when given, else `PIO_FVLM_VISUAL_KEEP` (1.0 unless set). Both set to
        different values is an error."""
        raw = (mm_processor_kwargs or {}).get("visual_keep")
        if raw is None:
            return self.visual_keep
        keep = validate_visual_keep(raw, field="--mm-processor-kwargs visual_keep")
        if "visual_keep" in self.model_fields_set and keep != self.visual_keep:
            raise ValueError(f"--mm-processor-kwargs visual_keep={keep} and {ENV_PREFIX}VISUAL_KEEP="
                             f"{self.visual_keep} disagree; set the server default in one place")
        return keep

    @classmethod
    def unknown_env(cls, environ: Mapping[str, str] | None = None) -> list[str]:
        """`PIO_FVLM_*` variables that name no setting (typos, most likely)."""
        environ = os.environ if environ is None else environ
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields} | _OTHER_ENV
        return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PioFvlmSettings":
        """Reads `PIO_FVLM_<FIELD>` variables; raises ValueError naming the variable."""
        values = _Environment(cls, os.environ if environ is None else environ)()
        if isinstance(values.get("visual_keep"), str):
            # A request's keep must be a JSON number, so the validator refuses strings.
            try:
                values["visual_keep"] = float(values["visual_keep"])
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}VISUAL_KEEP must be a number, got {values['visual_keep']!r}") from None
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "settings"
            message = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"{ENV_PREFIX}{field.upper()}: {message} (got {first.get('input')!r})") from None

"""The ``model:`` section: a built-in kind (``mlp``, ``gpt``) or an import target of the user's own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from .section import Section, TargetStr


class ModelInit(Section):
    """How a model gets its values; shared by every ``model:`` form."""

    deferred_init: bool = Field(
        True,
        description="Build the model on the meta device and give each rank only what it keeps (ZeRO-3 shards, "
        "tensor-parallel slices, its pipeline stages), initialised as an eager build on the same seed; a model "
        "that cannot be built on meta is built whole, with a warning.",
    )
    pretrained: str | None = Field(
        None,
        description="Weights to start from: a transformers directory (config.json + model.safetensors or "
        "model.safetensors.index.json), a .safetensors file, or a disttrain checkpoint; each rank reads only "
        "the slices it keeps. Names are the model's state_dict names.",
    )
    pretrained_strict: bool = Field(
        True,
        description="A missing or unexpected key or a shape mismatch in model.pretrained is an error; false: "
        "they are listed and the rest loads (missing tensors keep their initialisation).",
    )


class MLPConfig(ModelInit):
    kind: Literal["mlp"] = Field("mlp", description="A multi-layer perceptron classifier.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field([128, 64], description="Hidden layer widths.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")


class GPTConfig(ModelInit):
    kind: Literal["gpt"] = Field("gpt", description="A decoder-only transformer language model.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    d_model: int = Field(128, ge=1, description="Width of the residual stream.")
    seq_len: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class TargetModel(ModelInit):
    target: TargetStr = Field(description="'package.module:factory': a callable returning the nn.Module to train.")
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the factory.")


# tag -> class: the loader strips the tag from error locations and lists the keys of the tagged class.
MODEL_KINDS: dict[str, type[Section]] = {"mlp": MLPConfig, "gpt": GPTConfig, "import": TargetModel}


def _model_tag(value: Any) -> str | None:
    """A mapping with ``target`` is an import target, otherwise its ``kind`` names a built-in."""
    if isinstance(value, dict):
        return "import" if "target" in value else value.get("kind")
    if isinstance(value, TargetModel):
        return "import"
    return value.kind if isinstance(value, (MLPConfig, GPTConfig)) else None


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")] | Annotated[GPTConfig, Tag("gpt")] | Annotated[TargetModel, Tag("import")],
    Discriminator(_model_tag),
]

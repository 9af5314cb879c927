"""What a run trains: the config's diffusion family (`vdm_jax.DDPM` or `vdm_jax.VDM`) on the run's modules.

`make_objective(config, model_config)` builds the family from the config's `diffusion` settings once
and returns an `Objective`: a frozen, hashable adapter (static under `jax.jit`) whose methods take
the modules (the U-Net, and the learned schedule or None) and a batch of uint8 pixels, make the
network's `pred_fn` and the data, and call the family. All the math is the family's.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from vdm_jax.families import DDPM, LEARNED_SCHEDULES, VDM
from vdm_jax.guidance import guided
from vdm_jax.models import UNetConfig, as_pred_fn
from vdm_jax.pixels import data_to_pixels, pixels_to_data
from vdm_jax.schedules import LearnedLinearSchedule, LearnedSchedule

Terms = dict[str, jax.Array]
FAMILIES = {"ddpm": DDPM, "vdm": VDM}
_CONFIG_KEY = {"loss_type": "diffusion.loss", "prediction": "model.prediction"}  # family field -> config key


@dataclasses.dataclass(frozen=True)
class Objective:
    """A family and what the run adds to it: the images' shape, and a learned VDM schedule's settings.

    Losses and bounds are per example ([B], nats per image); `batch` is {'image': uint8 [B, H, W, C]},
    and for a class-conditional model also 'label' int [B]; `schedule_model` is the learned schedule's
    module (None unless learned).
    """

    family: DDPM | VDM
    image_shape: tuple[int, int, int]
    schedule_hidden: int = 0  # VDM's learned MLP schedule ('learned'): the width of its monotone MLP
    variance_minimisation: bool = False  # ... and whether its shape follows ∇E[L_diffusion²]
    num_classes: int = 0  # K > 0: a class-conditional network (class K: no label)
    label_dropout: float = 0.0  # ... trained with 'no label' for this fraction of the examples

    @property
    def learned_schedule(self) -> bool:
        """A VDM whose schedule is learned: 'learned' (monotone MLP) or 'learned_linear' (b + |w| t)."""
        return isinstance(self.family, VDM) and self.family.schedule in LEARNED_SCHEDULES

    @property
    def minimise_variance(self) -> bool:
        return self.learned_schedule and self.variance_minimisation

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    # (the family's, for the steps and tools that read them)
    prediction = property(lambda self: self.family.prediction)
    grid = property(lambda self: self.family.grid)
    terms = property(lambda self: self.family.terms)
    timesteps = property(lambda self: self.family.timesteps)
    learned_variance = property(lambda self: self.family.learned_variance)

    def init_schedule(self, rngs: nnx.Rngs) -> LearnedSchedule | LearnedLinearSchedule | None:
        if not self.learned_schedule:
            return None
        ends = (self.family.gamma_min, self.family.gamma_max)
        if self.family.schedule == "learned_linear":
            return LearnedLinearSchedule(*ends)  # (w and b: no random initialisation)
        return LearnedSchedule(*ends, hidden=self.schedule_hidden, rngs=rngs)

    def _learned(self, schedule_model) -> dict:
        """The family methods' `gamma_fn=` argument: the learned schedule, if there is one."""
        return {"gamma_fn": schedule_model} if self.learned_schedule else {}

    def pred_fn(self, model, schedule_model=None, *, key=None):
        """`pred_fn(z_t, t)` of the U-Net (`key`: dropout; None: none). A VDM's network sees γ(t)
        mapped to [0, 1] by the configured end points, so it knows the noise level even when the
        schedule is learned; a DDPM's sees t = i/T."""
        if isinstance(self.family, DDPM):
            return as_pred_fn(model, key=key)
        return as_pred_fn(model, self.family.gamma_schedule(**self._learned(schedule_model)),
                          gamma_min=self.family.gamma_min, gamma_max=self.family.gamma_max, key=key)

    def _data(self, batch) -> jax.Array:
        return pixels_to_data(batch["image"], grid=self.family.grid)

    def _given(self, pred_fn, labels):
        """`pred_fn(z_t, t)` of the network given `labels` (None, or an unconditional network: as it is)."""
        return pred_fn if labels is None or not self.num_classes else lambda z_t, t: pred_fn(z_t, t, labels)

    def per_example_loss(self, model, schedule_model, batch, *, key) -> tuple[jax.Array, Terms]:
        """The family's training loss (with dropout) and its terms; a class-conditional model is given
        each example's label, or 'no label' with probability `label_dropout`."""
        key_model, key_loss = jax.random.split(key)
        labels = None
        if self.num_classes:  # (its own key, fold_in: the other draws stay those of an unconditional run)
            labels = drop_labels(batch["label"], self.label_dropout, self.num_classes, key=jax.random.fold_in(key, 2))
        pred_fn = self._given(self.pred_fn(model, schedule_model, key=key_model), labels)
        return self.family.loss(pred_fn, self._data(batch), key=key_loss, **self._learned(schedule_model))

    def per_example_bound(self, model, schedule_model, batch, *, key, conditional: bool = True) -> Terms:
        """An unbiased estimate of −ELBO: 'prior' + 'diffusion' + 'reconstruction' = 'total'; of a
        class-conditional model given the batch's labels, or with `conditional=False` given none."""
        labels = batch["label"] if conditional and self.num_classes else None
        return self.family.bound(self._given(self.pred_fn(model, schedule_model), labels), self._data(batch),
                                 key=key, **self._learned(schedule_model))

    def per_example_full_vlb(self, model, batch, *, key) -> Terms:
        """The whole discrete bound, every step (a DDPM's `full_bound`), with 'per_t' [B, T]."""
        if not isinstance(self.family, DDPM):
            raise ValueError("full_vlb needs a DDPM model (a discrete bound over all T steps); for a VDM use "
                             "more draws of its continuous-time ELBO.")
        return self.family.full_bound(self.pred_fn(model), self._data(batch), key=key)

    def sample(self, model, schedule_model, *, key, num: int, sampler: str = "ancestral", sample_steps: int = 0,
               labels=None, guidance=0.0, guidance_interval: tuple[float, float] | None = None):
        """uint8 [num, H, W, C] by the family's `sampler` (`vdm_jax.SAMPLERS`); of a class-conditional
        model, given `labels` [num] with classifier-free guidance of weight `guidance` (optionally
        only where γ(t) is in `guidance_interval`; `vdm_jax.guided`), or unconditional (labels None)."""
        pred_fn = self.pred_fn(model, schedule_model)
        if labels is not None and self.num_classes:
            pred_fn = guided(pred_fn, labels, guidance, null_label=self.num_classes, interval=guidance_interval,
                             gamma_fn=self.family.gamma_schedule(**self._learned(schedule_model)))
        x = self.family.sample(pred_fn, (num, *self.image_shape), key=key,
                               sampler=sampler, sample_steps=sample_steps, **self._learned(schedule_model))
        return data_to_pixels(x, grid=self.family.grid).astype(jnp.uint8)

    def flow(self, model, schedule_model=None):
        """What the probability-flow ODE takes: (pred_fn, the schedule, t_min), the family's `flow`."""
        return self.family.flow(self.pred_fn(model, schedule_model), **self._learned(schedule_model))

    def check_sample_steps(self, sample_steps: int, sampler: str, name: str = "training.sample_steps") -> int:
        """The steps `sampler` will take (0: its default); raises ValueError naming `name` if it can't."""
        return self.family.check_sampling(sampler, sample_steps, name)


def drop_labels(labels, rate: float, num_classes: int, *, key) -> jax.Array:
    """`labels` with each replaced by 'no label' (class `num_classes`) with probability `rate`,
    independently: how a class-conditional model also learns the unconditional prediction."""
    return jnp.where(jax.random.bernoulli(key, rate, labels.shape), num_classes, labels)


def make_objective(config, model_config: UNetConfig) -> Objective:
    """The objective of `config.diffusion.family`, from the `diffusion` settings its fields name.

    Raises ValueError naming the config keys for values the family can't take, or a model that
    does not fit it (a learned variance needs the network's extra output channels).
    """
    d = config.diffusion
    cls = FAMILIES[d.family]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "prediction"]
    settings = {name: d[_CONFIG_KEY.get(name, f"diffusion.{name}").split(".")[1]] for name in fields}
    try:
        family = cls(prediction=model_config.prediction, **settings)
    except ValueError as e:  # the family's words, in the config's: "schedule must be" is "diffusion.schedule must be"
        text = str(e).split(": ", 1)[1]
        for name in [*fields, "prediction"]:
            text = re.sub(rf"(?<![\w.]){name}(?=\s*(?:=|must\b|and\b))", _CONFIG_KEY.get(name, f"diffusion.{name}"),
                          text)
        raise ValueError(f"diffusion.family={d.family!r}: {text}") from None
    # Variance minimisation trains a schedule's shape; only the MLP schedule has one ('learned_linear' is
    # all end points, trained on the bound as in the official code; docs/math.md §1.7).
    learned = d.family == "vdm" and d.schedule == "learned"
    if learned and d.schedule_hidden < 1:
        raise ValueError(f"config key 'diffusion.schedule_hidden' must be >= 1, got {d.schedule_hidden}.")
    if family.learned_variance != model_config.learned_variance:
        raise ValueError(
            f"diffusion.family={d.family!r} with diffusion.variance={d.variance!r} needs "
            f"model.learned_variance={family.learned_variance}, got {model_config.learned_variance}: a "
            "learned variance (a DDPM option) needs the model's extra output channels, and those channels are "
            "only trained with a learned variance.")
    return Objective(family, (model_config.image_size, model_config.image_size, model_config.in_channels),
                     schedule_hidden=d.schedule_hidden if learned else 0,
                     variance_minimisation=bool(learned and d.variance_minimisation),
                     num_classes=model_config.num_classes,
                     label_dropout=float(config.training.label_dropout) if model_config.num_classes else 0.0)

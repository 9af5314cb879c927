"""vdm_jax: DDPM and Variational Diffusion Models in JAX, as pure, tested functions.

Every formula cites its section of MATH.md (the project's reference). The public API is listed in
the README's API table.
"""
from vdm_jax.schedules import (
    ContinuousView,
    CosineSchedule,
    DiscreteSchedule,
    LearnedSchedule,
    LinearSchedule,
    alpha_sigma,
    cosine_betas,
    linear_betas,
    snr,
)
from vdm_jax.diffusion import (
    PREDICTIONS,
    eps_and_x,
    eps_from_score,
    eps_from_v,
    eps_from_x,
    q_posterior,
    q_sample,
    q_step,
    score_from_eps,
    v_from_eps,
    x_from_eps,
    x_from_v,
)
from vdm_jax.pixels import data_to_pixels, pixels_to_data
from vdm_jax.losses import (
    ddpm_decoder_nll,
    denoising_kl,
    diffusion_loss,
    eps_matching,
    gaussian_decoder_nll,
    hybrid_loss,
    normal_kl,
    prior_loss,
    reverse_log_variance,
    sample_times,
    score_matching,
    simple_loss,
    vdm_decoder_nll,
    vlb_term,
    x0_matching,
)
from vdm_jax.elbo import bits_per_dim, ddpm_log_variance, ddpm_vlb, vdm_elbo
from vdm_jax.variance import variance_minimising_grads
from vdm_jax.sampling import ddim_sample, ddpm_sample, ddpm_step, strided_times, vdm_sample
from vdm_jax.xla_flags import set_cpu_xla_flags

__version__ = "0.1.0"

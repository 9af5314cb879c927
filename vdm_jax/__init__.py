"""vdm_jax: DDPM and Variational Diffusion Models in JAX, as pure, tested functions.

Every formula cites its section of docs/math.md (the project's reference). The calling convention
(data x in [-1, 1] [B, ...]; `key` keyword-only; predictions before targets; every pred_fn gets
t ∈ [0, 1]; samplers return the data estimate) is written once in the README.
"""
from vdm_jax.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    LearnedLinearSchedule,
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
    per_example,
    prediction_target,
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
from vdm_jax.sampling import (SPACINGS, ddim_sample, ddpm_sample, ddpm_step, dpm_solver_sample, ode_sample,
                              solver_times, strided_times, vdm_sample)
from vdm_jax.likelihood import dequantized_bits_per_dim, ode_log_likelihood
from vdm_jax.families import DDPM, SAMPLERS, VDM, Sampler
from vdm_jax.guidance import guided
from vdm_jax.fid import (FeatureStatistics, frechet_distance, inception_score, kernel_inception_distance,
                         load_statistics, sample_quality, save_statistics)
from vdm_jax.xla_flags import set_cpu_xla_flags

__version__ = "0.2.0"

__all__ = [
    # schedules (docs/math.md §1)
    "alpha_sigma", "snr", "linear_betas", "cosine_betas",
    "DiscreteSchedule", "LinearSchedule", "CosineSchedule", "LearnedSchedule", "LearnedLinearSchedule",
    # forward process, posterior, predictions (§2-4)
    "PREDICTIONS", "per_example", "q_sample", "q_step", "q_posterior",
    "x_from_eps", "eps_from_x", "score_from_eps", "eps_from_score", "v_from_eps", "eps_from_v", "x_from_v",
    "eps_and_x", "prediction_target",
    # pixels
    "pixels_to_data", "data_to_pixels",
    # losses (§5)
    "x0_matching", "eps_matching", "score_matching", "reverse_log_variance", "normal_kl", "denoising_kl",
    "vlb_term", "simple_loss", "hybrid_loss", "prior_loss", "ddpm_decoder_nll", "vdm_decoder_nll",
    "gaussian_decoder_nll", "diffusion_loss", "sample_times",
    # ELBOs (§5)
    "bits_per_dim", "ddpm_log_variance", "ddpm_vlb", "vdm_elbo", "variance_minimising_grads",
    # samplers (§6)
    "ddpm_sample", "ddpm_step", "vdm_sample", "ddim_sample", "strided_times", "dpm_solver_sample", "ode_sample",
    "solver_times", "SPACINGS",
    # the families: loss, bound and sampling of a network (§5, §6), and the samplers' registry
    "DDPM", "VDM", "SAMPLERS", "Sampler",
    # classifier-free guidance of a conditional network, for every sampler (§6.9)
    "guided",
    # likelihoods (§6.8)
    "ode_log_likelihood", "dequantized_bits_per_dim",
    # sample quality from Inception features (§7)
    "FeatureStatistics", "frechet_distance", "kernel_inception_distance", "inception_score", "sample_quality",
    "save_statistics", "load_statistics",
    # process-wide tuning (not math)
    "set_cpu_xla_flags",
]

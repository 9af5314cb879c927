"""Training: the config schema, the objective, pure steps, data parallelism, checkpoints, the loop."""
from vdm_jax._extras import require_train_extra

require_train_extra("vdm_jax.training", "grain", "PIL", "ml_collections", "orbax.checkpoint", "tensorboardX", "tqdm")

from vdm_jax.training.checkpoint import (Checkpointer, CheckpointMismatchError, CheckpointWriteError,
                                         CorruptCheckpointError)
from vdm_jax.training.config import (check_config, checked_config, compute_dtype, default_config, set_model,
                                     validate_config)
from vdm_jax.training.distributed import initialize_distributed
from vdm_jax.training.evaluation import (RunNotFoundError, evaluate_bpd, evaluate_ode_bpd, format_bpd_table,
                                         generate_samples, inception_features, load_checkpoint, save_samples)
from vdm_jax.training.faults import NonFiniteError
from vdm_jax.training.loop import WorkdirError, train_and_evaluate
from vdm_jax.training.objective import Objective, make_objective
from vdm_jax.training.parallel import make_mesh
from vdm_jax.training.state import Optimizer, TrainState, create_train_state, decay_mask
from vdm_jax.training.steps import eval_step, ode_bpd_step, sample_step, train_step, train_steps

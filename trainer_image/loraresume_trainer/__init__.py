"""LoraResume trainer: the Unsloth LoRA pipeline with durable, exactly resumable checkpoints in S3.

Light modules (config, errors, outcome, s3uri, manifest, fingerprint, checkpoint_store)
import neither torch nor unsloth, so the operator can use them.
"""

__version__ = "0.1.0"

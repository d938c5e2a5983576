# Source on the H200 machine from the repository root: unpacks what its image lacks
# (.gpu/site.tar.xz from shared/gpu/make-site-archive.sh, .gpu/whl/*.whl: moto, boto3, peft 0.21.2)
# and sets the offline environment. See benchmarks/README.md.
set -e
mkdir -p /tmp/site
tar -xJf .gpu/site.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/trainer_image:$PWD/sandbox:$PWD
export PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
  HF_HUB_DISABLE_TELEMETRY=1 TRITON_CACHE_DIR=/tmp/triton_cache HF_HOME=/tmp/hf_home PYTHONUNBUFFERED=1
set +e

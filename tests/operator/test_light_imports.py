"""The operator uses the trainer's config model and checkpoint store without the training stack."""

import subprocess
import sys


def test_operator_imports_neither_torch_nor_unsloth():
    code = (
        "import sys, loraresume_operator.handlers, loraresume_operator.cli, loraresume_operator.crd;"
        "heavy = sorted(m for m in ('torch', 'unsloth', 'transformers', 'trl', 'peft') if m in sys.modules);"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]

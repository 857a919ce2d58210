import pytest
import torch

from lmpress.compress.models import tiny_llama

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! "
) * 20


@pytest.fixture
def tiny():
    """A fresh seeded tiny LLaMA (hidden 96, GQA 6/2 heads, tied embeddings) and its byte tokenizer."""
    return tiny_llama(seed=0)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 40), generator=g)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny ops (thread hand-offs on a loaded CPU cost more
    than the ops themselves); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""README.md: the set-up a newcomer runs literally, in the order it must run."""
import os
import re

from utils.cli import torch_pair_advice

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def section(title):
    text = open(README, encoding='utf-8').read()
    start = text.index(f'## {title}\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end >= 0 else None]


def test_the_cpu_only_build_is_installed_before_the_requirements_in_the_block_that_runs_both():
    """pip keeps a torch that is already installed: the CPU-only line after requirements.txt
    (which brings the CUDA build) did nothing."""
    blocks = re.findall(r'```bash\n(.*?)```', section('Set up'), re.S)
    cpu = [b for b in blocks if 'download.pytorch.org/whl/cpu' in b]
    assert cpu, 'no CPU-only command'
    for block in cpu:
        lines = block.splitlines()
        cpu_line = next(i for i, line in enumerate(lines) if 'whl/cpu' in line)
        assert 'pip install -r requirements.txt' in lines[cpu_line + 1:], block
        assert re.search(r'pip install torch(==\S+)? torchvision(==\S+)? --index-url', lines[cpu_line])  # one pair


def test_the_set_up_says_what_each_install_weighs_and_its_pinned_pair_matches():
    text = ' '.join(section('Set up').split())
    assert re.search(r'CUDA, about [\d.]+ GB to download and [\d.]+ GB installed', text)
    assert re.search(r'CPU-only build is about [\d.]+ GB to download and [\d.]+ GB installed', text)
    for torch_version, vision in re.findall(r'torch==(2\.\d+\.\d+) torchvision==(\S+)', text):
        assert torch_pair_advice(torch_version).split('torchvision==')[1] == vision


def test_the_demo_section_says_its_time_and_ap_vary_and_why():
    text = ' '.join(section('Quick start').split())
    assert 'vary from machine to machine' in text and 'AVX-512' in text and 'AVX2' in text
    assert 'busy' in text

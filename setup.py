"""fairseq-clusterformer: neural clustering attention (ClusterFormer, ACL 2022) as a fairseq plugin.

Install with ``bash scripts/bootstrap.sh`` (it installs torch and a working fairseq first, see
docs/install.md), or by hand::

    pip install torch==2.13.0          # or keep the torch you already have (e.g. a CUDA build)
    pip install cython numpy wheel setuptools
    pip install --no-build-isolation fairseq-fixed==0.12.3.1
    pip install -e .[test]
"""

from setuptools import find_packages, setup

install_requires = [
    # A range, not a pin: a torch the user already has (CPU or CUDA build) must satisfy it, so pip
    # never replaces it with a multi-GB CUDA wheel nobody asked for. 2.1 is the first release with
    # the scaled_dot_product_attention masks and stable sort we rely on.
    "torch>=2.1",
    # fairseq itself is deliberately NOT listed: the official `fairseq` 0.12.2 does not import on
    # Python 3.11+, and the two working forks (`fairseq-fixed`, `ve-fairseq`) install the same
    # import package. Listing either would make pip install it over a fairseq the user already
    # has working. scripts/bootstrap.sh installs one; the plugin checks it at import.
    "numpy",
    "sacrebleu>=2.0",
    "sentencepiece",
    "subword-nmt",
    "sacremoses",
]

extras_require = {
    # The suite runs smoke tests of the benchmark and experiment scripts, which plot.
    # Exact pins where a new release could change what the suite checks or how it formats.
    "test": [
        "pytest>=7",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.15",
        "ruff==0.17.5",
        "matplotlib",
        "psutil",
        # fairseq's --tensorboard-logdir logs nothing without it (docs/scaling.md).
        "tensorboardX==2.6.5",
    ],
    "bench": ["matplotlib", "psutil"],
    # The paper's baselines (--self-attention-encoder/-decoder lsh|routing, docs/baselines.md):
    # the published implementations and every package they pull in, pinned exactly (their
    # releases are from 2021 and their dependencies float). Resolved by pip on torch 2.13 CPU;
    # torch itself stays the user's (install_requires), and packaging, which CoLT5-attention
    # also needs, is a pip/setuptools dependency already present in every environment.
    "baselines": [
        "reformer-pytorch==1.4.4",
        "routing-transformer==1.6.1",
        "axial-positional-embedding==0.3.12",
        "CoLT5-attention==0.11.2",
        "einops==0.8.2",
        "hyper-connections==0.4.11",
        "local-attention==1.11.2",
        "mixture-of-experts==0.2.3",
        "product-key-memory==0.3.0",
        "torch-einops-utils==0.2.0",
    ],
}
extras_require["all"] = sorted({dep for deps in extras_require.values() for dep in deps})

setup(
    name="fairseq-clusterformer",
    version="0.1.0",
    description="ClusterFormer neural clustering attention for fairseq machine translation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_clusterformer", "fairseq_clusterformer.*"]),
    # Opt-in import hook so stock fairseq commands load ClusterFormer checkpoints without
    # --user-dir: `clusterformer-autoload --install` (docs/install.md).
    py_modules=["fairseq_clusterformer_autoload"],
    install_requires=install_requires,
    entry_points={
        "console_scripts": [
            "clusterformer-choose-k = fairseq_clusterformer.tools.choose_k:main",
            "clusterformer-show-clusters = fairseq_clusterformer.tools.show_clusters:main",
            "clusterformer-average-checkpoints = fairseq_clusterformer.tools.average_checkpoints:main",
            "clusterformer-mt-prep = fairseq_clusterformer.tools.mt_prep:_cli",
            "clusterformer-autoload = fairseq_clusterformer_autoload:main",
        ]
    },
    extras_require=extras_require,
)

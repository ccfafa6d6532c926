from setuptools import find_packages, setup

setup(
    name="product-key-memory",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "examples", "scripts"]),
    version="0.4.0",
    license="MIT",
    description="Product Key Memory layers for PyTorch: drop-in, tested, fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    url="https://github.com/lucidrains/product-key-memory",
    keywords=["transformers", "artificial intelligence", "memory", "product keys"],
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "einops>=0.7",
        "colt5-attention>=0.10.14",
        # not imported by the layers, but torch warns "Failed to initialize NumPy" on every import without it
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.7", "tqdm>=4.60", "triton", "faiss-cpu>=1.7",
                 "transformers>=4.40", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1",
                 "PEER-pytorch==0.2.2", "mkdocs>=1.6", "mkdocstrings[python]>=0.27"],
        "plot": ["matplotlib>=3.7"],
        "examples": ["tqdm>=4.60", "matplotlib>=3.7"],
        "hf": ["transformers>=4.40"],
        "faiss": ["faiss-cpu>=1.7"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        # the documentation site (mkdocs.yml): mkdocs build --strict
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.27"],
    },
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
    ],
)

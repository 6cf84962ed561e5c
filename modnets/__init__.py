"""modnets: when and how are modular neural networks better than dense ones?"""

__version__ = "0.1.0"

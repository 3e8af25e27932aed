"""byzflower: Byzantine-robust federated learning with variance-reduced honest clients, on Flower."""

__version__ = "0.1.0"

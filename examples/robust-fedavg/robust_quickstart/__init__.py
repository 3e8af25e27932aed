"""A Flower quickstart-style app (local epochs, FedAvg rounds) with RobustFedAvg as its strategy."""

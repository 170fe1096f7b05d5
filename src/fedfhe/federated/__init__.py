"""Federated training with Flower: the model task, the ClientApp, the ServerApp and the simulation."""

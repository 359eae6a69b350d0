"""Federation on Flower: the client's task, the ClientApp, the ServerApp and the simulation driver."""

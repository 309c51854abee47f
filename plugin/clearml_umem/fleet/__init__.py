"""Past one GPU: routers on several GPUs (one per clearml-agent), and a front that sends each request
to the router where its model already is. choose.py is the pure decision; probe.py keeps the view
of the routers; relay.py sends a request; front.py is the standalone front; discovery.py finds the
routers (a static list, or running serve tasks through the ClearML SDK)."""

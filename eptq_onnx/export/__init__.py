"""Writing the QDQ model, its fake-quant reference, validation and latency."""

"""EPTQ: the Label-Free Hessian, the network-wise objective and its optimization loop."""

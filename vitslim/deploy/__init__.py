"""Deployment: a slim model as an ONNX file or a torch.export program (export), checked against the eager model.

(CUDA graphs and the latency table are features of the model layer, vitslim.cuda_graphs and vitslim.latency:
slim models and plan_for use them, so they sit below this package.)
"""

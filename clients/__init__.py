"""Client side, plain torch (no Flower): honest gradient estimators and their gradient machinery."""

from clients.estimators import ESTIMATORS, SAGA, SARAH, SGD, SVRG, Estimator
from clients.gradients import ModelGradients, SampleGrads
from clients.workers import WorkerData

__all__ = ["ESTIMATORS", "SAGA", "SARAH", "SGD", "SVRG", "Estimator", "ModelGradients", "SampleGrads", "WorkerData"]

"""The backbone feature layers of the SVM benchmarks, mmselfsup's (without Paddle: the config checks them).

Layer `featL` is stage L of [stem, res2, res3, res4, res5], average-pooled to mmselfsup's grid for it
(12, 6, 4, 3, 2 cells a side: its MultiPooling output at 224 px; ppmoco/models/pooling.py) and
flattened; `gap` is the last stage averaged globally, the kNN feature.
"""

# layer name -> (index into Module.extract_stages' maps, pooled grid size a side).
LAYERS = {"feat1": (0, 12), "feat2": (1, 6), "feat3": (2, 4), "feat4": (3, 3), "feat5": (4, 2), "gap": (4, 1)}

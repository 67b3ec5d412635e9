"""The YOLOv1 loss, the paper's equation (3), vectorised over batch, cells and boxes."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from model import split_output
from utils import box_iou_elementwise, cell_boxes_to_xyxy


class YoloLoss(nn.Module):
    """Sum-squared YOLO loss, divided by the batch size.

    ``pred`` is the model output ``(N, S, S, 5B+C)`` (layout in model.py). ``target`` is the grid
    encoding of dataset.py, ``(N, S, S, 5+C)``: per cell ``(x, y, w, h, obj, one-hot C)`` with x, y
    the centre's offset in the cell (cell units) and w, h relative to the image; all zero in
    cells without an object.

    For each object the *responsible* predictor is the one of its cell's B boxes with the highest
    IoU with it; when all its IoUs are 0, the one closest to it in darknet's ``box_rmse`` sense: the
    squared error of ``(x / S, y / S, w, h)``, centre offsets and sizes relative to the image (the
    paper does not say). Terms, each summed over the batch then divided by N:

    * ``coord``: lambda_coord * [(x-x^)^2 + (y-y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
      over responsible predictors (the network outputs sqrt w directly, so this stays finite for
      any output);
    * ``obj``: (C - C^)^2 over responsible predictors, with the target C^ = IoU(pred, truth)
      detached (darknet's rescore) or 1 when ``rescore=False``;
    * ``noobj``: lambda_noobj * C^2 over every other predictor, in empty and in object cells;
    * ``cls``: sum over classes of (p - p^)^2 in cells that hold an object.

    Returns a dict of 0-dim tensors ``total, coord, obj, noobj, cls`` (computed in float32).
    """

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, lambda_coord: float = 5.0,
                 lambda_noobj: float = 0.5, rescore: bool = True):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.lambda_coord, self.lambda_noobj, self.rescore = lambda_coord, lambda_noobj, rescore

    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        N, S, B, C = pred.shape[0], self.S, self.B, self.C
        if pred.shape[1:] != (S, S, 5 * B + C) or target.shape[1:] != (S, S, 5 + C) or target.shape[0] != N:
            raise ValueError(f"pred {tuple(pred.shape)} / target {tuple(target.shape)} do not match "
                             f"S={S}, B={B}, C={C}")
        pred, target = pred.float(), target.float()
        boxes, conf, cls = split_output(pred, B, C)             # (N,S,S,B,4) (N,S,S,B) (N,S,S,C)
        t_box, obj, t_cls = target[..., :4], target[..., 4], target[..., 5:]
        obj_mask = obj > 0                                      # (N,S,S)
        t_coord = torch.cat([t_box[..., :2], t_box[..., 2:].clamp(min=0).sqrt()], -1)  # (N,S,S,4)

        with torch.no_grad():
            iou = box_iou_elementwise(cell_boxes_to_xyxy(boxes, S),
                                      cell_boxes_to_xyxy(t_coord.unsqueeze(-2), S))  # (N,S,S,B)
            p_rel = torch.cat([boxes[..., :2] / S, boxes[..., 2:].square()], -1)   # (N,S,S,B,4)
            t_rel = torch.cat([t_box[..., :2] / S, t_box[..., 2:]], -1)             # (N,S,S,4)
            sq_err = (p_rel - t_rel.unsqueeze(-2)).pow(2).sum(-1)                # (N,S,S,B)
            any_overlap = iou.amax(-1, keepdim=True) > 0
            best = torch.where(any_overlap, iou, -sq_err).argmax(-1)            # (N,S,S)
            resp = nn.functional.one_hot(best, B).bool() & obj_mask.unsqueeze(-1)  # (N,S,S,B)

        coord = (boxes - t_coord.unsqueeze(-2)).pow(2).sum(-1)                  # (N,S,S,B)
        coord = self.lambda_coord * (coord * resp).sum()
        conf_target = iou if self.rescore else torch.ones_like(iou)
        obj_loss = ((conf - conf_target).pow(2) * resp).sum()
        noobj = self.lambda_noobj * (conf.pow(2) * ~resp).sum()
        cls_loss = ((cls - t_cls).pow(2).sum(-1) * obj_mask).sum()
        terms = {"coord": coord / N, "obj": obj_loss / N, "noobj": noobj / N, "cls": cls_loss / N}
        terms["total"] = sum(terms.values())
        return terms

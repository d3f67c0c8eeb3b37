"""What the locate stage writes under locate.out (its readers: evaluate's chain, register)."""
FOLDS_DIR = "folds"          # folds/fold_<k>/ localiser.pt + meta.json; folds/state.json
STATE_FILE = "state.json"
OOF_FILE = "oof_boxes.csv"
CROPS_FILE = "oof_crops.npy"
EXAMPLES_FILE = "examples.png"
# headline.json (`dvc metrics show`, `make exp`): short name -> metrics.json key
HEADLINE = {"hit": "locate_oof_hit_rate", "iou": "locate_oof_iou_mean", "mm": "locate_oof_centre_error_mm_median",
            "fixed_hit": "locate_fixed_box_hit_rate", "unseen_hit": "locate_unseen_hit_rate",
            "unseen_mm": "locate_unseen_centre_error_mm_median"}

"""What the locate stage writes under locate.out (its readers: evaluate's chain, register)."""
FOLDS_DIR = "folds"          # folds/fold_<k>/ localiser.pt + meta.json; folds/state.json
STATE_FILE = "state.json"
OOF_FILE = "oof_boxes.csv"
CROPS_FILE = "oof_crops.npy"
EXAMPLES_FILE = "examples.png"

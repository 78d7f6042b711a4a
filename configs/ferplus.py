"""The paper's FER+ setup (section 3.3): batch 128, 200 epochs, Adam with the Table 1 schedule,
cosine-similarity loss (eq. 4), paper augmentation, majority labels. Meant for a GPU.

Set `--config.dataset.manual_dir` to the folder holding FER2013Train/ FER2013Valid/ [FER2013Test/]
(or fer2013.csv + fer2013new.csv); see fermsca/datasets/README.md.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset.name = "ferplus"
    c.dataset.label_mode = "majority"
    c.num_epochs = 200
    c.batch_size = 128
    c.eval_batch_size = 512
    c.log_every_steps = 50
    return c

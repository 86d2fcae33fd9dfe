"""Train ATLOP's DocREModel with the fused head on DocRED, or offline on a synthetic corpus.

A script-path entry to ncrl_kernels.train_docred (the code lives in the package, so
`python -m ncrl_kernels.train_docred` is the same program); it takes ATLOP's train.py flags:

    python examples/train_docred.py                  # offline demo: synthetic corpus, small random BERT
    python examples/train_docred.py --data_dir ./dataset/docred --model_name_or_path bert-base-cased ...

See `--help` and docs/atlop.md.
"""
from ncrl_kernels.train_docred import main

if __name__ == "__main__":
    main()

"""Train BreastCancerNet on scikit-learn's breast-cancer data (shipped with scikit-learn: nothing is downloaded).

    python train.py        # writes artifacts/bc.pt (the state_dict) and data/bc.pt (the split)

Your own training code would stand here: the library only needs the state_dict,
and, for the report and the int8 variant's fidelity bound, the held-out data.
"""

from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from models.bc import BreastCancerNet

SEED = 0
EPOCHS = 150


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # one summation order: the same seed gives the same weights file
    table = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(table.data, table.target, test_size=0.25, random_state=SEED, stratify=table.target)
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    model = BreastCancerNet()
    model.mean.copy_(x_train.mean(dim=0))
    model.std.copy_(x_train.std(dim=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=1e-4)
    for epoch in range(1, EPOCHS + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        loss.backward()
        optimizer.step()
        if epoch % 50 == 0:
            print(f"epoch {epoch}/{EPOCHS} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"held-out accuracy {accuracy:.4f} on {len(y_test)} rows")

    Path("artifacts").mkdir(exist_ok=True)
    Path("data").mkdir(exist_ok=True)
    torch.save(model.state_dict(), "artifacts/bc.pt")
    torch.save({"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, "data/bc.pt")
    print("wrote artifacts/bc.pt and data/bc.pt")


if __name__ == "__main__":
    main()

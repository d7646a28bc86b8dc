"""A plain PyTorch training loop tuned by tunefleet: a linear model on synthetic data.

    tunefleet study create examples/byo/linear.yaml
    tunefleet agent --server http://127.0.0.1:8000 -- python examples/byo/train_linear.py

`python examples/byo/train_linear.py` on its own trains once with the defaults below.
"""

import sys

import torch

from tunefleet import sdk

params = {"lr": 0.05, "batch_size": 32, "epochs": 5, **sdk.params()}
lr, batch_size, epochs = float(params["lr"]), int(params["batch_size"]), int(params["epochs"])

torch.manual_seed(0)
features = torch.randn(512, 8)
targets = features @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
train_x, train_y, val_x, val_y = features[:384], targets[:384], features[384:], targets[384:]

model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=lr)
first_epoch = 1
if sdk.resume_dir():  # a paused trial, resumed: continue after the epoch it paused at
    state = torch.load(sdk.resume_dir() / "state.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    first_epoch = state["epoch"] + 1

for epoch in range(first_epoch, epochs + 1):
    for start in range(0, len(train_x), batch_size):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(train_x[start:start + batch_size]), train_y[start:start + batch_size])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        val_loss = torch.nn.functional.mse_loss(model(val_x), val_y).item()
    print(f"epoch {epoch}: val_loss {val_loss:.4f}")
    action = sdk.report(epoch, val_loss, max_step=epochs, samples=(epoch - first_epoch + 1) * len(train_x))
    if action == "pause":  # keep what resuming needs, then exit
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   sdk.checkpoint_dir() / "state.pt")
    if action != "continue":
        sys.exit(0)

sdk.complete(val_loss=val_loss)

"""prepare -> train -> evaluate -> recommend from Python (the test suite runs this file)."""
import fastattrec as fa

fa.synthesize("quickstart/ratings.dat", users=200, items=400, interactions=10_000, force=True)
data = fa.prepare("quickstart/ratings.dat", "quickstart/data", force=True)
run = fa.train(data, "quickstart/run", preset="quality", epochs=10, dim=32, device="cpu",
               force=True, log=print)  # log=print: a line per epoch
print(run.history().select("epoch", "train_loss", "val_metric"))  # one row per epoch
print(run.evaluate(ks=[10]))  # HR@10, NDCG@10, MRR: AttRec and popularity, both protocols
print(run.recommend(users=[1, 2], k=5))  # top 5 unseen items of users 1 and 2

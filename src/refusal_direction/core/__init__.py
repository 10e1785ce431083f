"""The method itself, model-independent: load a chat model and find its residual-stream sites (`model`), mean
activations (`activations`), difference-in-means directions (`directions`), interventions on the residual
stream (`interventions`), and greedy decoding on the paper's path (`decoding`); small shared pieces
(`padding`, `batching`, `sdpa`) and the offline model fetch (`fetch`). Imports nothing above it."""

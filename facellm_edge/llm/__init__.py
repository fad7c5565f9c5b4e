"""llama.cpp building blocks of the generator: engine (model/context/batches), sampling, KV slots per face."""

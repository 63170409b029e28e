"""What a trained run is turned into or used for: the merged model (`merged`), generation with a base and its
adapter (`inference`) and llama.cpp's GGUF files (`gguf`). Import the modules themselves; this package
re-exports nothing."""

"""Named model shapes for benchmarks and tests with random weights."""

from models.llama import LlamaConfig

SHAPES = {
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                                num_kv_heads=3, head_dim=64, max_position_embeddings=65536, tie_word_embeddings=True),
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=128, max_position_embeddings=65536),
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=4096),
}

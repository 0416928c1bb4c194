//! SmolLM2-135M's linear layers per decoder layer, as (out_features, in_features): q, k, v, o,
//! gate, up, down. Shared by the examples that stream a whole model's weights.
pub const LAYER_LINEARS: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

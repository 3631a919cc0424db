# whisper-max's own CPU kernels, registered as MAX custom ops, one file per kind of op:
#   rows.mojo           whisper_max.linear_rows     products of a few rows (decoder steps), FMA
#   decoder_layer.mojo  whisper_max.decoder_layer   one fused decoder block for a few rows
#   layer_attention.mojo  its self- and cross-attention
#   select_tokens.mojo  whisper_max.select_tokens   the next-token choice after a decoder call
#   attention.mojo      whisper_max.attention       the encoder's attention in float32
#   taps.mojo           whisper_max.conv_taps       a 1-D convolution's windows as rows (im2col)
#   bf16.mojo           whisper_max.linear_bf16, attention_bf16   bfloat16 on AVX512_BF16
#   pairs.mojo          whisper_max.linear_pairs    a few rows on AVX512_BF16 (bfloat16 pair panels)
#   amx.mojo            whisper_max.linear_amx    bfloat16 on Intel AMX tiles (and the tile helpers)
#   amx_attention.mojo  whisper_max.attention_amx
#   amx_rows.mojo       whisper_max.linear_rows_amx   a few rows on AMX tiles
#   cast.mojo           whisper_max.to_bfloat16    float32 rounded to bfloat16 (cross K/V)
#   simd.mojo           helpers (vector width, bfloat16 rounding, softmax pieces)
#   team.mojo           a kernel's steps as phases of jobs shared by the workers in one dispatch
# The converter lowers graph ops to them (converter/lower/custom.py) and picks the kind for the
# CPU it compiles for (converter/lower/target.py); their machine code is compiled into the
# package's MEF, so loading a package needs neither this source nor a compile.

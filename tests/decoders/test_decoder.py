"""The decoder's blocks see the mask token at masked positions and the projected encoder
features at visible ones."""
import torch
from helpers import randomize_

from fcmae import FCMAE
from fcmae.decoders import FCMAEDecoder


def block_input(decoder, run):
    """What `decoder.blocks` receives while `run()` runs: (N, D, h, w)."""
    seen = []
    handle = decoder.blocks.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_block_input_is_mask_token_where_masked_and_projection_where_visible():
    torch.manual_seed(0)
    decoder = randomize_(FCMAEDecoder(in_dim=12, decoder_dim=8, decoder_depth=1, patch_size=4, in_chans=3))
    x = torch.randn(2, 12, 3, 4)
    mask = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]],
                         [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]]])  # (N, h, w), 1 = masked
    got = block_input(decoder, lambda: decoder(x, mask))
    projected = decoder.proj(x).detach()  # (N, D, h, w)
    token = decoder.mask_token.detach().view(-1)  # (D,)
    masked = mask.bool()
    assert torch.equal(got.permute(0, 2, 3, 1)[masked], token.expand(int(masked.sum()), -1))
    assert torch.equal(got.permute(0, 2, 3, 1)[~masked], projected.permute(0, 2, 3, 1)[~masked])
    assert not torch.allclose(projected.permute(0, 2, 3, 1)[masked], token.expand(int(masked.sum()), -1))


def test_fcmae_passes_the_mask_with_masked_as_one():
    """Through the whole model: the decoder replaces exactly the patches the returned mask marks."""
    torch.manual_seed(0)
    model = randomize_(FCMAE({"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}, img_size=64, decoder_dim=16)).eval()
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]])  # (N, L)
    with torch.no_grad():
        got = block_input(model.decoder, lambda: model(torch.randn(2, 3, 64, 64), mask)).flatten(2)  # (N, D, L)
    token = model.decoder.mask_token.detach().view(-1, 1)  # (D, 1)
    is_token = (got == token).all(dim=1)  # (N, L)
    assert torch.equal(is_token, mask.bool())

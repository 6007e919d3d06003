"""An offline T5-style tokenizer for RAHF models built without a hub (tests, the demo, tiny models).

Byte-level BPE trained on a small embedded corpus: any text tokenizes and decodes back exactly, with T5's special
token ids (pad 0, eos 1, unk 2) so that the T5 decoder's defaults hold. Models that start from a pretrained T5 use
that T5's own tokenizer instead.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# Words of the synthetic benchmark and of common text-to-image prompts; enough for BPE to learn useful merges.
_CORPUS_WORDS = """
a an the and or of in on at to with without above below under over next left right front behind between near
beside inside outside top bottom middle corner center background foreground two three four five six one many some
red orange yellow green blue purple pink brown black white grey gray gold silver cyan magenta dark light bright
circle square triangle star rectangle hexagon ring cross heart diamond ellipse oval cube sphere ball box
wooden table floor wall brick grass gravel sky water sand road street room kitchen garden forest mountain beach
photo photograph painting drawing illustration render portrait landscape picture image art style digital oil
astronaut coffee cup cat dog rocket camera person man woman child girl boy face hand hands eyes hair people
car house tree flower bird horse city night day sunset sunrise snow rain cloud clouds light shadow reflection
big small large tiny huge little tall short long round flat shiny soft smooth rough old new beautiful cute
sitting standing holding wearing looking flying running walking lying playing riding eating drinking
highly detailed realistic photorealistic cinematic lighting trending artstation 4k 8k hd sharp focus masterpiece
implausibility misalignment heatmap score plausibility alignment aesthetics overall misaligned keywords
0 1 2 3 4 5 6 7 8 9 10 100 , . ! ? : ; " ' ( ) [ ] - _ / & + = *
"""


def build_offline_tokenizer(vocab_size: int = 1024, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Trains (deterministically, in about a second) a byte-level BPE tokenizer with T5's special-token ids."""
    if vocab_size < 300:
        raise ValueError(f"`vocab_size` must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = _CORPUS_WORDS.split()
    # Sentences built from the word list, repeated so that frequent pairs win merges in a stable order.
    corpus = [" ".join(words[i : i + 8]) for i in range(0, len(words), 4)] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    assert (tok.token_to_id(PAD), tok.token_to_id(EOS), tok.token_to_id(UNK)) == (0, 1, 2)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )

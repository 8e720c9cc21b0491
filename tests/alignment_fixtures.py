"""A hand-made vocabulary for forced-alignment tests (test_forced_alignment, test_long_alignment)."""


class CharVocab:
    """One piece per letter a..z (ids 1..26, word starts marked like SentencePiece), <unk> 0, blank 27."""

    blank_id = 27
    unk_id = 0

    def pieces(self, text):
        out = []
        for word in text.split(" "):
            out += [("▁" + word[0]) if word else "▁"] + list(word[1:])
        return out

    def ids(self, text):
        return [1 + (ord(p[-1]) - 97) % 26 for p in self.pieces(text)]

    def id_text(self, token_id):
        return " ⁇ " if token_id == 0 else chr(96 + token_id)

    def id_piece(self, token_id):
        return "<unk>" if token_id == 0 else chr(96 + token_id)

    def unknown_characters(self, text):
        return []

"""What the labels are for: editing units by label, visualising them, pruning by them."""

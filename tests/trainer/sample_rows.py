"""A step-pair row as the trainer reads it from the pairs' Parquet, shared by the batching tests (their exact ids
and masks are worked out on this text)."""

ROW = {
    "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "prefix": "Step 1: Tom starts with 3 apples.\n",
    "step_index": 2,
    "chosen": "He buys 4 more, so 3 + 4 = 7.",
    "rejected": "So 3 * 4 = 12 apples.",
}

"""Step-DPO loss and step log-probabilities against hand-computed values and a naive full log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

from psr_ray.trainer.loss import sequence_logps, step_dpo_loss


def test_step_dpo_loss_hand_computed():
    # beta 0.5: r_w = 0.5 * (-1 - -2) = 0.5, r_l = 0.5 * (-3 - -2) = -0.5 -> -log sigmoid(1) = 0.31326.
    out = step_dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), abs=1e-6)
    assert out.loss.item() == pytest.approx(0.3133, abs=1e-4)
    assert out.chosen_rewards.tolist() == [0.5]
    assert out.rejected_rewards.tolist() == [-0.5]


def test_step_dpo_loss_is_batch_mean_and_ln2_at_reference():
    same = torch.tensor([-4.0, -7.0])
    at_ref = step_dpo_loss(same, same, same, same, beta=0.1)
    assert at_ref.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # Two examples with margins 2 and -2 (beta 1): mean of -log sigmoid(2) and -log sigmoid(-2).
    out = step_dpo_loss(torch.tensor([0.0, -2.0]), torch.tensor([-2.0, 0.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_step_dpo_loss_gradient_only_reaches_policy():
    policy_w = torch.tensor([-1.0], requires_grad=True)
    policy_l = torch.tensor([-3.0], requires_grad=True)
    out = step_dpo_loss(policy_w, policy_l, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    out.loss.backward()
    # d/dx -log sigmoid(beta * x) = -beta * sigmoid(-beta * x) at margin 1: -0.5 * sigmoid(-1).
    g = -0.5 * (1 / (1 + math.exp(1.0)))
    assert policy_w.grad.item() == pytest.approx(g, abs=1e-6)
    assert policy_l.grad.item() == pytest.approx(-g, abs=1e-6)


def test_sequence_logps_matches_naive_log_softmax():
    torch.manual_seed(0)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 1:4] = 1  # a step followed by padding
    # Row 2: nothing masked in -> exactly 0.
    naive = torch.zeros(batch)
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b in range(batch):
        for t in range(1, length):
            if mask[b, t]:
                naive[b] += logp[b, t - 1, labels[b, t]].float()
    got = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=0)
    assert got[2].item() == 0.0


def test_scored_mask_keeps_each_rows_own_positions():
    from psr_ray.trainer.loss import next_tokens, scored_mask

    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, 4:6] = 1
    mask[1, 1:3] = 1  # rows score different spans: each keeps its own, not their union
    scored = scored_mask(mask)
    assert scored.nonzero().tolist() == [[0, 3], [0, 4], [1, 0], [1, 1]]
    ids = torch.arange(12).view(2, 6)
    assert next_tokens(ids, scored).tolist() == [4, 5, 7, 8]


def test_logits_at_the_scored_positions_match_a_real_models_full_forward(tiny_model_dir):
    # forward.scored_logits cuts the head's input to each row's scored positions (a pre-hook on the tiny
    # Llama's head): the log-probabilities and their gradients equal the full forward's.
    from transformers import AutoModelForCausalLM

    from psr_ray.trainer.forward import batch_logps, scored_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 8:11] = 1
    mask[1, 4:6] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}

    def run(logps_of):
        model.zero_grad()
        logps = logps_of()
        logps.sum().backward()
        return logps.detach(), model.get_input_embeddings().weight.grad.clone()

    full, full_grad = run(lambda: sequence_logps(model(input_ids=ids).logits, ids, mask))
    scored = scored_logits(model, batch)
    assert scored.logits.shape[0] == 5  # 3 + 2 positions, not the 2 x 6 of their union
    got, got_grad = run(lambda: batch_logps(scored_logits(model, batch), batch))
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grad, full_grad, atol=1e-5, rtol=1e-4)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed after the forward


def test_sequence_logps_position_zero_is_never_scored():
    # Position 0 has no preceding token, so a mask bit there must be ignored.
    logits = torch.zeros(1, 2, 4)
    labels = torch.tensor([[1, 2]])
    got = sequence_logps(logits, labels, torch.tensor([[1, 1]]))
    assert got.item() == pytest.approx(-math.log(4), abs=1e-6)


def test_token_kl_hand_computed_on_masked_positions_only():
    # Vocabulary of 2, one sequence of 3 tokens; positions 0 and 1 predict tokens 1 and 2. Only token 2 is in
    # the mask, so only position 1's distributions count: p = softmax([0, ln 3]) = (1/4, 3/4), q = (1/2, 1/2).
    from psr_ray.trainer.loss import scored_mask, token_kl

    policy = torch.tensor([[[5.0, 0.0], [0.0, math.log(3.0)], [9.0, 9.0]]])
    reference = torch.tensor([[[0.0, 5.0], [0.0, 0.0], [1.0, 2.0]]])
    mask = scored_mask(torch.tensor([[0, 0, 1]]))
    total, count = token_kl(policy[mask], reference[mask])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert count.item() == 1 and total.item() == pytest.approx(expected, abs=1e-6)
    both = scored_mask(torch.tensor([[0, 1, 1]]))
    assert token_kl(policy[both], policy[both])[0].item() == pytest.approx(0.0, abs=1e-7)

"""A plain NumPy GradCraft written from the paper, one task at a time.

Bai et al., KDD 2024, Eqs. for magnitude adjustment, the projection target
``G_i g~_i^T = z`` and ``w = (G_i G_i^T)^{-1}(-G_i g^_i^T + z)``. Works on the
flattened ``(T, d)`` gradient matrix, never on a Gram matrix.
"""

import numpy as np


def gradcraft_numpy(g, tau, eps, norms=None, pinv=False):
  """g: (T, d) float64 gradients. Returns the (d,) update, g_hat, g_tilde.

  ``pinv=False`` solves with the inverse, as in the paper (full-rank
  conflicting sets). ``pinv="plain"`` uses ``pinv(G_i G_i^T)``.
  ``pinv="unit"`` solves for the coefficients of the *unit* conflicting
  gradients with the pseudo-inverse (the library's convention when a
  conflicting set is rank deficient and the targets cannot all be met; both
  give the same ``g_tilde`` whenever the system is consistent, e.g. for
  duplicated tasks).
  """
  g = np.asarray(g, np.float64)
  t = g.shape[0]
  n = np.linalg.norm(g, axis=1) if norms is None else np.asarray(norms)
  top = n.max()
  g_hat = np.empty_like(g)
  for i in range(t):
    if n[i] > 0:
      g_hat[i] = tau * top / n[i] * g[i] + (1 - tau) * g[i]
    else:
      g_hat[i] = g[i]
  hat_norms = np.linalg.norm(g_hat, axis=1)
  g_tilde = np.empty_like(g)
  for i in range(t):
    conflicting = [k for k in range(t) if k != i and g_hat[i] @ g_hat[k] < 0]
    if not conflicting:
      g_tilde[i] = g_hat[i]
      continue
    gi = g_hat[conflicting]  # (n, d)
    z = eps * hat_norms[i] * hat_norms[conflicting]
    a = gi @ gi.T
    b = -gi @ g_hat[i] + z
    if pinv == "unit":
      u = gi / hat_norms[conflicting][:, None]
      w = np.linalg.pinv(u @ u.T) @ (-u @ g_hat[i] + z / hat_norms[conflicting])
      w = w / hat_norms[conflicting]
    elif pinv:
      w = np.linalg.pinv(a) @ b
    else:
      w = np.linalg.solve(a, b)
    g_tilde[i] = g_hat[i] + w @ gi
  return g_tilde.mean(axis=0), g_hat, g_tilde

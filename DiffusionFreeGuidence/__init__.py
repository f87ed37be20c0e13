"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022): only what guidance
adds to Diffusion/ (the class embedding, the resamplers that differ, label dropout, the guided
noise estimate); everything else is Diffusion/'s code."""
